"""`python -m tui [options]`: the same as `cope tui [options]`."""

import sys

from cope_local.cli import main

raise SystemExit(main(["tui", *sys.argv[1:]]))
