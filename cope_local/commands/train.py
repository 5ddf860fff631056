"""`cope profile train NAME` and `cope tam train`: run the personalization pipeline.

Progress goes to stderr (bars with ETA and loss per stage); stdout gets the
summary (or JSON with --json). Ctrl-C stops after the current step with a
checkpoint saved; running the same command again resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cope_local.errors import CopeError


def _add_config_args(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: auto: cuda, else mps, else cpu)")
    p.add_argument("--config", metavar="FILE.toml", help="training settings: a TOML file with a [train] table")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="one training setting, e.g. --set user.lr=3e-4 --set dpo=false (repeatable; see "
                        "cope_local/train/config.py for all keys and the paper's defaults)")
    p.add_argument("--max-steps", type=int, default=None, help="cap the optimizer steps of each training stage")
    p.add_argument("--json", action="store_true", help="print the stage results as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    from cope_local.commands.profile import profile_verbs

    verbs = profile_verbs(subparsers)
    p = verbs.add_parser(
        "train", help="personalize: train and activate an adapter on the profile's history",
        description="Runs the stages inputs, pairs, sft, export, activate (with --dpo also negatives and dpo, "
                    "the paper's CoPe training; with --set dpo_crossfit=true also crossfit). Finished stages are "
                    "skipped; an interrupted run resumes where it stopped. Settings come from the defaults (the "
                    "paper's), the profile's [train] table, --config and --set, in that order.")
    p.add_argument("name", help="profile name")
    p.add_argument("--dpo", action="store_true",
                   help="also synthetic negatives + DPO, the paper's CoPe training (~7x the time; drafts then "
                        "default to cope mode; same as --set dpo=true)")
    p.add_argument("--stages", help="comma-separated stages to run (default: all): "
                                    "inputs,pairs,sft,crossfit,negatives,dpo,export,activate")
    p.add_argument("--from-edits", action="store_true",
                   help="learn from your edits instead: DPO on (your edited draft > the generated one) pairs "
                        "saved in the TUI, starting from the trained adapter; then export, verify, activate")
    _add_config_args(p)
    p.set_defaults(func=cmd_profile_train)

    tam = subparsers.add_parser("tam", help="task adapters (TAM) that profiles build on",
                                description="A TAM is a LoRA trained on non-personal text of one task; a profile "
                                            "uses it with `--set tam_adapter=NAME` (or tam_adapter in its [train] table).")
    tverbs = tam.add_subparsers(dest="tam_command", metavar="VERB")
    tam.set_defaults(func=lambda args: (tam.print_help(), 2)[1])
    t = tverbs.add_parser("train", help="train a task adapter from a corpus (JSONL/CSV rows, text files, mail)")
    t.add_argument("--task", required=True, help="task template the corpus is for (e.g. email-reply, review)")
    t.add_argument("--data", required=True, metavar="PATH", help="the corpus: a file or folder")
    t.add_argument("--name", default=None, help="TAM name (default: the task's name)")
    t.add_argument("--model", default=None, help="base model name or .gguf path (default: smollm2-135m)")
    t.add_argument("--stages", help="comma-separated stages (default: all): inputs,pairs,sft,export")
    _add_config_args(t)
    t.set_defaults(func=cmd_tam_train)


def _print_results(results, as_json: bool, extra: dict) -> None:
    if as_json:
        print(json.dumps({**extra, "stages": [r.__dict__ for r in results]}, ensure_ascii=False, indent=1, default=str))
        return
    for r in results:
        took = f"{r.seconds:6.1f} s" if r.status == "ran" else " " * 8
        print(f"  {r.stage:<10} {r.status:<8} {took}")


def _settings_line(cfg) -> str | None:
    from cope_local.train.settings import changed_settings

    changed = changed_settings(cfg)
    if not changed:
        return None
    return "settings: " + ", ".join(f"{k}={v}" for k, v in changed.items())


def cmd_profile_train(args) -> int:
    from cope_local.profile import load_profile
    from cope_local.train.pipeline import Pipeline
    from cope_local.train.settings import load_config
    from cope_local.train.tam import Workspace

    prof = load_profile(args.name)
    sets = [*args.sets, "dpo=true"] if args.dpo else args.sets
    cfg = load_config(prof, config_file=args.config, sets=sets, device=args.device, max_steps=args.max_steps)
    line = _settings_line(cfg)
    print(f"training profile {prof.name!r} (task {prof.task})" + (f"; {line}" if line else ""), file=sys.stderr)
    pipe = Pipeline(Workspace.from_profile(prof), cfg)
    if args.from_edits:
        if args.stages:
            raise CopeError("--from-edits runs its own steps; leave out --stages")
        from cope_local.train.edits import train_from_edits

        info = train_from_edits(pipe, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        if args.json:
            print(json.dumps({"profile": prof.name, "edits": info}, ensure_ascii=False, indent=1, default=str))
        else:
            print(f"  edits: {info['pairs']} pairs, margin {info['margin_before']:+.3f} -> {info['margin_after']:+.3f}, "
                  f"active adapter {Path(info['adapter']).name}")
            print(f"done: cope draft --profile {prof.name} \"...\"")
        return 0
    results = pipe.run(args.stages.split(",") if args.stages else None)
    _print_results(results, args.json, {"profile": prof.name})
    if not args.json and any(r.stage == "activate" and r.status in ("ran", "skipped") for r in results):
        print(f"done: cope draft --profile {prof.name} \"...\"")
    return 0


def cmd_tam_train(args) -> int:
    from cope_local.train.pipeline import Pipeline
    from cope_local.train.settings import load_config
    from cope_local.train.tam import tam_workspace

    name = args.name or args.task
    ws = tam_workspace(name, args.task, args.data, args.model)
    cfg = load_config(None, config_file=args.config, sets=args.sets, device=args.device, max_steps=args.max_steps)
    line = _settings_line(cfg)
    print(f"training task adapter {name!r} (task {ws.task.name})" + (f"; {line}" if line else ""), file=sys.stderr)
    results = Pipeline(ws, cfg).run(args.stages.split(",") if args.stages else None)
    _print_results(results, args.json, {"tam": name, "path": str(ws.path)})
    if not args.json and (ws.path / "tam.json").exists():
        print(f"done: {ws.path}; use it in a profile with: cope profile train NAME --set tam_adapter={name}")
    return 0
