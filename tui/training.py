"""Training from the TUI: `cope profile train NAME` in a subprocess, its progress lines parsed.

A subprocess, not a thread: training imports torch, which the drafting process never does,
and a child can be interrupted like Ctrl-C in a terminal (SIGINT: the trainer saves a
checkpoint after the current step), so Cancel then Train again resumes where it stopped.
The pipeline prints one line per event on stderr, each starting with its stage
("sft: step 3/40  loss 2.103 ... ETA 1:05"); parse_line turns one into a Progress.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Mirrors cope_local.train.pipeline.STAGES (tests check they agree); not imported, since
# importing the training package from the UI process is what this module avoids.
STAGES = ("inputs", "pairs", "sft", "crossfit", "negatives", "dpo", "export", "activate")
_LINE = re.compile(r"^\s*(?P<stage>[a-z]+):\s*(?P<rest>.*)$")
_FRACTION = re.compile(r"(?:step\s+)?(\d+)\s*/\s*(\d+)")
_LOSS = re.compile(r"\bloss\s+([-+]?\d+(?:\.\d+)?)(?:\s*->\s*([-+]?\d+(?:\.\d+)?))?")  # "loss 2.1" or "loss 2.1 -> 1.7"
_ETA = re.compile(r"\bETA\s+(\d+:\d\d(?::\d\d)?)")


@dataclass
class Progress:
    stage: str
    fraction: float | None  # 0..1 when the line says "N/M"; 1.0 for a finished or skipped stage
    loss: float | None
    eta: str | None
    text: str  # the line, for the detail column
    state: str = "running"  # running | done | off | stopped


def parse_line(line: str) -> Progress | None:
    """A progress line of `cope profile train` -> Progress, or None for lines of no stage."""
    line = line.strip().replace("\x1b[K", "")
    m = _LINE.match(line)
    if not m:
        return None
    stage, rest = m.group("stage"), m.group("rest")
    if stage == "tam":
        stage = "sft"  # the TAM's LoRA is trained by the same code and labelled "tam"
    if stage not in STAGES:
        return None
    frac = None
    state = "running"
    f = _FRACTION.search(rest)
    if f and int(f.group(2)) > 0:
        frac = min(1.0, int(f.group(1)) / int(f.group(2)))
    if rest.startswith("up to date"):
        frac, state = 1.0, "done"
    elif rest.startswith("off"):
        frac, state = 1.0, "off"
    elif rest.startswith(("stopped", "stopping")):
        state = "stopped"
    loss = _LOSS.search(rest)
    eta = _ETA.search(rest)
    loss_value = float(loss.group(2) or loss.group(1)) if loss else None  # the latest loss
    return Progress(stage, frac, loss_value, eta.group(1) if eta else None, line, state)


def train_command(profile: str, extra: list[str] | None = None) -> list[str]:
    """The command the Train button runs (the CLI's: the same stages, settings and resume)."""
    return [sys.executable, "-m", "cope_local", "profile", "train", profile, *(extra or [])]


class TrainRun:
    """One `cope profile train` child; iterate lines(), cancel() from any thread."""

    def __init__(self, profile: str, extra: list[str] | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.cmd = train_command(profile, extra)
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                     bufsize=1, env=env, start_new_session=True)
        self.tail: list[str] = []  # the last lines, for the error message
        self.cancelled = False

    def lines(self) -> Iterator[str]:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                if line.strip():
                    self.tail = (self.tail + [line])[-20:]
                    yield line

    def wait(self) -> int:
        return self.proc.wait()

    def cancel(self) -> None:
        """Like Ctrl-C: the trainer finishes its step, saves a checkpoint and exits; a rerun resumes."""
        self.cancelled = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def error(self) -> str:
        errs = [x for x in self.tail if x.startswith("cope: error:")]
        return errs[-1][len("cope: error:"):].strip() if errs else (self.tail[-1] if self.tail else "no output")


def run_training(profile: str, on_progress: Callable[[Progress], None], on_line: Callable[[str], None] | None = None,
                 extra: list[str] | None = None, started: Callable[[TrainRun], None] | None = None) -> tuple[int, str]:
    """Blocking (call from a worker thread) -> (exit code, error text or "")."""
    run = TrainRun(profile, extra)
    if started:
        started(run)
    for line in run.lines():
        if on_line:
            on_line(line)
        p = parse_line(line)
        if p:
            on_progress(p)
    code = run.wait()
    return code, "" if code == 0 else run.error()
