import signal

from cope_local.cli import main

# The TUI runs training as `python -m cope_local` and cancels it with SIGINT (like Ctrl-C). A parent
# started in the background by a shell without job control ignores SIGINT, and children inherit that:
# the cancel would be lost until a training loop installs its own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

raise SystemExit(main())
