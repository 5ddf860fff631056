"""Progress bars with ETA and loss for training stages, and the Ctrl-C / SIGTERM handling they share.

A terminal gets a tqdm bar on stderr; a pipe or a log (bench, tests, CI) gets
one plain line every ~10 % instead of a bar redrawn with carriage returns.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, tests) a line every ~10 %, with ETA and loss."""

    def __init__(self, label: str, total: int, initial: int = 0, enabled: bool = True):
        self.label, self.total, self.done = label, total, initial
        self.t0, self.start = time.monotonic(), initial
        self.enabled = enabled
        self.bar = None
        self.every = max(1, total // 10)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=True)

    def update(self, done: int, loss: float) -> None:
        self.done = done
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            self.bar.update(done - self.bar.n)
        elif self.enabled and (done % self.every == 0 or done == self.total):
            rate = (done - self.start) / max(1e-9, time.monotonic() - self.t0)
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            print(f"{self.label}: step {done}/{self.total}  loss {loss:.3f}  {rate:.2f} steps/s  "
                  f"ETA {_fmt_s(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = round(s)
    return f"{s // 60}:{s % 60:02d}"


class StopRequests:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self, label: str):
        self.label = label
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{self.label}: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
