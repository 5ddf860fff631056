"""`cope eval run`, `sweep` and `compare`: the benchmark harness (cope_local/eval).

Progress goes to stderr; stdout gets where the report is (or one JSON object with --json).
Everything is cached under --out: rerunning the same command trains and decodes nothing new.
"""

from __future__ import annotations

import argparse
import json

DEFAULT_OUT = "eval-out"


def register(subparsers: argparse._SubParsersAction) -> None:
    from cope_local.eval.generate import METHODS

    ev = subparsers.add_parser("eval", help="evaluate on LaMP / LongLaMP users: ROUGE of base, TAM, OPPU, CoPe",
                               description="Per user: OPPU (SFT) on the profile, negatives + DPO, then every query "
                                           "decoded by every method and scored with ROUGE-1/ROUGE-L.")
    verbs = ev.add_subparsers(dest="eval_command", metavar="VERB")
    ev.set_defaults(func=lambda args: (ev.print_help(), 2)[1])

    r = verbs.add_parser(
        "run", help="train per user, decode every query by every method, write results and report",
        description="Writes OUT/results.jsonl (one row per generation), OUT/table.md (like the paper's Table 1, "
                    "with paired bootstrap CIs of cope-oppu and cope-tam) and OUT/rougeL.png. TAM: a fixed 2-fold "
                    "split of the file's users by a hash of user_id (fold A users get a TAM trained on fold B's "
                    "histories, and vice versa); --no-tam uses the raw base as amateur. Finished training stages "
                    "and generations are reused: a rerun resumes.")
    _add_data_args(r)
    r.add_argument("--users", type=int, default=None, metavar="N", help="evaluate the first N users (default: all)")
    r.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated (default: all): {','.join(METHODS)}")
    r.add_argument("--model", default=None, help="base model name or .gguf path (default: smollm2-135m)")
    r.add_argument("--alpha", type=float, default=None, help="CoPe contrast weight (default: the task's; LaMP-7 0.7)")
    r.add_argument("--tau", type=float, default=None, help="CoPe head set threshold (default: the task's; LaMP-7 0.3)")
    r.add_argument("--max-tokens", type=int, default=None, help="new tokens per output (default: the task's cap)")
    r.add_argument("--one-paragraph", action="store_true",
                   help="end every output at its first blank line (a base model without a chat template, such as "
                        "gemma3-270m, repeats its answer after one)")
    r.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="the last N profile items of each user become extra queries and leave its training "
                        "history (default 0)")
    r.add_argument("--no-tam", action="store_true", help="no task adapter: the amateur is the raw base (much cheaper)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting, e.g. --set neg_samples=2 (repeatable; cope_local/train/config.py)")
    r.add_argument("--max-steps", type=int, default=None, help="cap the optimizer steps of each training stage")
    r.add_argument("--device", default=None, help="training device: cpu, cuda, mps (default: auto)")
    r.add_argument("--progress", action="store_true", help="per-step training progress bars on stderr")
    r.set_defaults(func=cmd_eval_run)

    s = verbs.add_parser("sweep", help="CoPe over a grid of alpha and tau on a run's adapters (decoding only)",
                         description="Needs the adapters of `cope eval run` with the same --data and --out. Writes "
                                     "OUT/sweep.md: ROUGE-L per (alpha, tau) and the CI of its difference to oppu.")
    _add_data_args(s)
    s.add_argument("--alpha", default="0.1,0.3,0.5,0.7", help="comma-separated alphas (default 0.1,0.3,0.5,0.7)")
    s.add_argument("--tau", default="0.1,0.2", help="comma-separated taus (default 0.1,0.2)")
    s.add_argument("--head-p", default="0", metavar="P,...",
                   help="comma-separated masses of an adaptive head set used in place of tau: the fewest top tokens "
                        "of the expert holding P of its probability (one token where it is sure); 0 = the tau rule "
                        "(default)")
    s.add_argument("--protect", default="none", help="comma-separated token classes the contrast leaves alone: "
                                                     "none (the paper), eos, eos+punct (default none)")
    s.add_argument("--users", type=int, default=None, metavar="N", help="only the first N users (default: the run's)")
    s.add_argument("--repetition-penalty", default="1", metavar="P,...",
                   help="comma-separated repetition penalties, applied to oppu and the swept row alike (default 1: off)")
    s.add_argument("--no-repeat-ngram", default="0", metavar="N,...",
                   help="comma-separated n: no n-gram twice in an output, for oppu and the swept row alike (default 0: off)")
    s.add_argument("--adapter-scale", default="1", metavar="S,...",
                   help="comma-separated weights of the user adapter in the expert, for oppu and the swept row alike "
                        "(default 1: as trained; 0.5 halves its update)")
    s.add_argument("--method", default="cope", choices=("cope", "oppu+cd"),
                   help="the contrastive row to sweep: cope (DPO adapter, default) or oppu+cd (SFT adapter)")
    s.set_defaults(func=cmd_eval_sweep)

    c = verbs.add_parser("compare", help="rows of different runs or settings side by side, paired by query",
                         description="Each SIDE is DIR:METHOD[:KEY=VALUE,...]: the rows of DIR/results.jsonl (a "
                                     "`cope eval run --out` folder) for METHOD whose settings hold those values, e.g. "
                                     "eval-out/strong:oppu+cd:alpha=0.3,adapter_scale=0.5. The first side is the "
                                     "reference: every other side gets paired bootstrap CIs of its difference to it, "
                                     "on the queries all sides share. A training variant needs its own --out folder; "
                                     "this is how it meets the others.")
    c.add_argument("sides", nargs="+", metavar="SIDE", help="DIR:METHOD[:KEY=VALUE,...]; the first is the reference")
    c.add_argument("--report", default=None, metavar="FILE.md", help="also write the tables to FILE.md")
    c.add_argument("--drop-mentions", action="store_true",
                   help="score every text without its @handles (outputs, references, the style classifier's "
                        "histories): what a gain is beside guessing whom the user addresses")
    c.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    c.set_defaults(func=cmd_eval_compare)


def _add_data_args(p) -> None:
    p.add_argument("--data", required=True, metavar="FILE",
                   help="users JSONL ({user_id, task, profile, queries} per line) or LaMP's questions JSON")
    p.add_argument("--outputs", default=None, metavar="FILE", help="LaMP's outputs JSON ({task, golds}) for --data")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output folder, also the cache of adapters and generations (default: ./{DEFAULT_OUT})")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="users in parallel processes, each with cores/J threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _jobs(n: int) -> int:
    from cope_local.errors import CopeError

    if n < 1:
        raise CopeError(f"--jobs {n}: must be at least 1")
    return n


def _command(args, verb: str) -> str:
    """The command line as parsed (cli.main may be called with an argv that is not sys.argv)."""
    from cope_local.eval.runner import command_line

    argv = ["eval", verb]
    for dest, value in vars(args).items():
        if dest in ("func", "command", "eval_command") or value in (None, False, [], ()):
            continue
        flag = "--" + dest.replace("_", "-") if dest != "sets" else "--set"
        for v in value if isinstance(value, list) else [value]:
            argv += [flag] if v is True else [flag, str(v)]
    return command_line(argv)


def cmd_eval_run(args) -> int:
    from cope_local.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(data=args.data, outputs=args.outputs, out=args.out, users=args.users,
                     methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), model=args.model,
                     alpha=args.alpha, tau=args.tau, max_tokens=args.max_tokens, one_paragraph=args.one_paragraph,
                     holdout=args.holdout,
                     no_tam=args.no_tam, jobs=_jobs(args.jobs), sets=tuple(args.sets), max_steps=args.max_steps,
                     device=args.device, command=_command(args, "run"),
                     progress=args.progress)
    summary = run_eval(cfg)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, default=str))
    else:
        for m, v in summary["methods"].items():
            print(f"  {m:<9} ROUGE-1 {v['rouge1']:.3f}  ROUGE-L {v['rougeL']:.3f}  {v['words']:.1f} words")
        print(f"{summary['generated']} generated, {summary['cached']} cached; report: {summary['out']}/table.md")
    return 0


def cmd_eval_sweep(args) -> int:
    from cope_local.eval.sweep import parse_grid, parse_ngrams, parse_protect, run_sweep

    summary = run_sweep(args.data, args.out, parse_grid(args.alpha, "alpha"), parse_grid(args.tau, "tau"),
                        outputs=args.outputs, jobs=_jobs(args.jobs), command=_command(args, "sweep"),
                        protects=parse_protect(args.protect), users=args.users, method=args.method,
                        penalties=parse_grid(args.repetition_penalty, "repetition-penalty"),
                        ngrams=parse_ngrams(args.no_repeat_ngram),
                        scales=parse_grid(args.adapter_scale, "adapter-scale", high=4),
                        head_ps=parse_grid(args.head_p, "head-p", high=1))
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, default=str))
    else:
        for name, p in summary["points"].items():  # name: alpha,tau[,protect][,rpP][,nrN][,sS][,hpP], or per-user
            print(f"  {name:<22} CoPe ROUGE-L {p['cope_rougeL']:.3f}  "
                  f"vs oppu {p['diff']:+.3f} [{p['query_ci'][0]:+.3f}, {p['query_ci'][1]:+.3f}]")
        print(f"{summary['generated']} generated, {summary['cached']} cached; report: {summary['out']}/sweep.md")
    return 0


def cmd_eval_compare(args) -> int:
    from pathlib import Path

    from cope_local.eval.compare import compare
    from cope_local.paths import atomic_write_text

    text, figures = compare(args.sides, mentions=not args.drop_mentions)
    if args.report:
        atomic_write_text(Path(args.report).expanduser(), text, mode=0o644)
    print(json.dumps(figures, ensure_ascii=False) if args.json else text, end="\n" if args.json else "")
    return 0
