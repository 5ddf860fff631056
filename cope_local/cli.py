"""The `cope` command: a thin argparse shell over the feature modules.

Each module in COMMAND_MODULES has `register(subparsers)`, which adds its
commands and sets `func` on them. Registration imports nothing heavy; a
handler imports torch or llama.cpp only when it runs, so `cope --help` and
`cope draft` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cope_local import __version__
from cope_local.errors import CopeError

COMMAND_MODULES = [
    "cope_local.commands.draft",  # cope draft
    "cope_local.commands.models",  # cope models list|path
    "cope_local.commands.profile",  # cope profile create|list|show|path|delete (train: commands/train.py)
    "cope_local.commands.train",  # cope profile train, cope tam train
    "cope_local.commands.demo",  # cope demo
    "cope_local.commands.tui",  # cope tui
    "cope_local.commands.eval",  # cope eval run|sweep
    "convert.cli",  # cope convert adapter|base|check
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cope", description="Offline personal writing assistant (CoPe decoding).")
    parser.add_argument("--version", action="version", version=f"cope-local {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CopeError as exc:
        print(f"cope: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
