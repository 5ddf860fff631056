"""`cope profile create|list|show|path|delete` (training: `cope profile train`, in commands/train.py).

Other modules add verbs under `cope profile` through `profile_verbs(subparsers)`,
which works whichever module registers first.
"""

from __future__ import annotations

import argparse
import json
import sys

from cope_local.errors import CopeError


def profile_verbs(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `cope profile VERB` subparsers action, created on first use."""
    parser = subparsers.choices.get("profile")
    if parser is None:
        parser = subparsers.add_parser(
            "profile", help="personal profiles: create, train, list, show, path, delete",
            description="A profile holds your writing history, its task and the adapters trained on it.")
        verbs = parser.add_subparsers(dest="profile_command", metavar="VERB")
        parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
        parser._cope_verbs = verbs  # type: ignore[attr-defined]
    return parser._cope_verbs  # type: ignore[attr-defined]


def register(subparsers: argparse._SubParsersAction) -> None:
    verbs = profile_verbs(subparsers)
    from cope_local.tasks import DEFAULT_TASK, TASKS

    p = verbs.add_parser("create", help="ingest your writing into a new profile",
                         description="Read mail (mbox, Maildir, .eml), .txt/.md files or JSONL/CSV rows into a profile. "
                                     "Mail: only messages from --me (or, without --me, in a Sent folder) are kept; "
                                     "quotes, signatures and HTML are stripped.")
    p.add_argument("name", help="profile name (letters, digits, . _ -)")
    p.add_argument("--from", dest="sources", metavar="PATH", nargs="+", action="extend", required=True,
                   help="files or folders to read (repeatable)")
    p.add_argument("--task", default=DEFAULT_TASK, help=f"what you write (default {DEFAULT_TASK}): {', '.join(TASKS)}")
    p.add_argument("--me", action="append", default=[], metavar="ADDR",
                   help="an email address you send from (repeatable); without it, mail in Sent folders counts as yours")
    p.add_argument("--dry-run", action="store_true", help="report what would be kept and skipped; write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_create)

    p = verbs.add_parser("list", help="list profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = verbs.add_parser("show", help="show a profile: task, sources, items, adapters")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)

    p = verbs.add_parser("path", help="print the folder of a profile (or of all profiles)")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_path)

    p = verbs.add_parser("delete", help="delete a profile, its history and adapters")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=_delete)
    # `cope profile train NAME` is registered by cope_local/commands/train.py via profile_verbs().


def _short(text: str | None, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _create(args: argparse.Namespace) -> int:
    from cope_local.profile import MIN_ITEMS, create_profile, too_few_message

    profile, items, report = create_profile(args.name, args.sources, task=args.task, me=args.me, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"profile": args.name, "path": str(profile.path) if profile else None, "task": args.task,
                          "dry_run": args.dry_run, "items": len(items), "report": report.to_dict()},
                         ensure_ascii=False, indent=1))
    else:
        if args.dry_run:
            print(f"dry run for profile {args.name!r} (nothing written):")
        else:
            print(f"created profile {args.name!r} (task {profile.task}): {len(items)} items")
        for line in report.lines():
            print("  " + line)
        for item in items[:3]:
            print(f"  e.g. {_short(item.output, 100)!r}" + (f"  <- {_short(item.input, 60)!r}" if item.input else ""))
        if profile:
            print(f"  path: {profile.path}")
            print(f"next: cope profile train {profile.name}")
    if args.dry_run and len(items) < MIN_ITEMS:
        raise CopeError(too_few_message(len(items), args.sources, report))
    return 0


def _list(args: argparse.Namespace) -> int:
    from cope_local.profile import describe, profile_names

    rows = []
    for name in profile_names():
        try:
            rows.append(describe(name))
        except CopeError as exc:
            rows.append({"name": name, "error": str(exc)})
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    if not rows:
        print("no profiles yet; create one with: cope profile create NAME --from PATH")
        return 0
    width = max([4] + [len(r["name"]) for r in rows])
    print(f"{'NAME':<{width}}  {'TASK':<12} {'ITEMS':>6}  ACTIVE ADAPTER")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<{width}}  (broken: {r['error']})")
            continue
        active = r["active_adapter"].rsplit("/", 1)[-1] if r["active_adapter"] else "-"
        print(f"{r['name']:<{width}}  {r['task']:<12} {r['items']:>6}  {active}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from cope_local.profile import describe

    info = describe(args.name, examples=3)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return 0
    for key in ("name", "path", "task", "created", "items"):
        print(f"{key}: {info[key]}")
    print(f"me: {', '.join(info['me']) or '-'}")
    print("sources: " + ("\n  ".join([""] + info["sources"]) if info["sources"] else "-"))
    print(f"stages: {', '.join(info['stages']) or '-'}")
    print(f"adapters: {', '.join(info['adapters']) or '-'}")
    print(f"active adapter: {info['active_adapter'] or info.get('active_error') or '- (train it: cope profile train ' + info['name'] + ')'}")
    ingest = info.get("ingest")
    if ingest:
        skipped = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in ingest.get("skipped", {}).items()) or "none"
        print(f"ingest: kept {ingest.get('kept')}, skipped {skipped}")
    for ex in info.get("examples", []):
        print(f"  e.g. {_short(ex['output'], 100)!r}" + (f"  <- {_short(ex['input'], 60)!r}" if ex["input"] else ""))
    return 0


def _path(args: argparse.Namespace) -> int:
    from cope_local.paths import profiles_dir
    from cope_local.profile import load_profile

    print(load_profile(args.name).path if args.name else profiles_dir())
    return 0


def _delete(args: argparse.Namespace) -> int:
    from cope_local.profile import delete_profile, load_profile, profile_dir

    path = profile_dir(args.name)
    if not path.exists():
        load_profile(args.name)  # raises the "not found" error
    if not args.yes:
        if not sys.stdin.isatty():
            raise CopeError(f"{path}: not deleting profile {args.name!r} without confirmation; add --yes")
        answer = input(f"delete profile {args.name!r} with its history and adapters ({path})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    delete_profile(args.name)
    print(f"deleted profile {args.name!r}")
    return 0
