"""`cope demo`: personalize the invented persona shipped with cope-local, then draft side by side.

Ro (cope_local/data/persona/, invented for this project) writes all
lowercase, in sailing metaphors, and signs "fair winds, —ro". The demo
creates profile `ro-demo` under COPE_HOME from her 40 replies, trains it
(reused when already trained: stages that are up to date are skipped), and
drafts replies to 3 new emails with the base model, the user adapter alone,
and CoPe (adapter contrasted with the base), in three columns at 80 characters.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from importlib.resources import files

DEMO_PROFILE = "ro-demo"
# Demo-only settings (not the paper's): a 135M model needs a bolder step to show a voice after one
# short run, and the whole demo must finish in ~6 minutes on 2 CPU cores. `cope profile train`
# uses the paper's defaults (cope_local/train/config.py).
DEMO_SETTINGS = {
    "user.lr": 3e-3,  # demo only: 30x the paper's 1e-4; at 1e-3 three epochs left no visible voice (loss 4.9 -> 3.6)
    "user.epochs": 3,  # demo only: the paper's 2; the third epoch fixes the lowercase and the sign-off
    "dpo": False,  # as `cope profile train` (stated, so the demo stays under 6 minutes whatever the default)
}
DEMO_MAX_TOKENS = 72  # demo only: enough for a short reply; keeps 9 drafts under ~30 s
MODES = ("base", "user", "cope")
TITLES = {"base": "base model", "user": "user adapter", "cope": "cope (contrast)"}


def register(sub) -> None:
    p = sub.add_parser("demo", help="personalize an invented persona and compare base, user and cope drafts",
                       description="Creates and trains profile 'ro-demo' from a sample history shipped with "
                                   "cope-local (an invented persona), then drafts replies in base, user and cope modes "
                                   "side by side. The first run trains (a few minutes on a laptop CPU); later runs reuse it.")
    p.add_argument("--profile", default=DEMO_PROFILE, help=f"profile to use or create (default {DEMO_PROFILE})")
    p.add_argument("--retrain", action="store_true", help="delete the demo profile first and train from scratch")
    p.add_argument("--width", type=int, default=80, help="output width in characters (default 80)")
    p.add_argument("--max-tokens", type=int, default=DEMO_MAX_TOKENS, help=f"tokens per draft (default {DEMO_MAX_TOKENS})")
    p.add_argument("--device", default=None, help="training device: cpu, cuda, mps (default auto)")
    p.add_argument("--json", action="store_true", help="print the drafts as JSON")
    p.set_defaults(func=cmd_demo)


def persona_paths():
    root = files("cope_local").joinpath("data/persona")
    return root.joinpath("history.jsonl"), root.joinpath("prompts.json")


def ensure_profile(name: str, retrain: bool = False):
    from cope_local import profile as profiles

    if retrain and profiles.profile_dir(name).exists():
        profiles.delete_profile(name)
    if (profiles.profile_dir(name) / "profile.toml").exists():
        return profiles.load_profile(name)
    history, _ = persona_paths()
    p, items, _report = profiles.create_profile(name, [str(history)], task="email-reply")
    print(f"demo: created profile {name!r} from the invented persona Ro ({len(items)} replies)", file=sys.stderr)
    return p


def train_demo(p, device: str | None = None):
    from cope_local.train.config import TrainConfig
    from cope_local.train.pipeline import Pipeline
    from cope_local.train.settings import load_config
    from cope_local.train.tam import Workspace

    # the profile's own [train] table, if someone edited it, wins over the demo settings
    cfg = load_config(p, device=device, base=TrainConfig().updated(DEMO_SETTINGS))
    print("demo: training settings (demo only): " + ", ".join(f"{k}={v}" for k, v in DEMO_SETTINGS.items())
          + "; all else the paper's defaults", file=sys.stderr)
    return Pipeline(Workspace.from_profile(p), cfg).run()


def draft_all(p, prompts: list[str], max_tokens: int) -> list[dict]:
    from cope_local import profile as profiles
    from cope_local.decode import Decoder, GenConfig

    task = p.task_spec()
    out = []
    with Decoder(p.model, profiles.active_adapter(p), tam=profiles.active_tam(p)) as dec:
        for text in prompts:
            row = {"prompt": text}
            for mode in MODES:
                cfg = GenConfig(mode=mode, alpha=task.default_alpha, tau=task.default_tau, max_tokens=max_tokens)
                g = dec.generate(task.draft_messages(text), cfg)
                row[mode] = g.text.strip()
            out.append(row)
    return out


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        lines += textwrap.wrap(para, width, break_long_words=True, replace_whitespace=False) or [""]
    return lines


def side_by_side(rows: list[dict], width: int = 80) -> str:
    """Each prompt, then its three drafts in columns separated by ' | ', within `width` characters."""
    col = max(12, (width - 3 * (len(MODES) - 1)) // len(MODES))
    out = []
    for n, row in enumerate(rows, 1):
        out.append("=" * min(width, 3 * col + 6))
        out += _wrap(f"{n}. {row['prompt']}", width)
        out.append("-" * min(width, 3 * col + 6))
        out.append(" | ".join(TITLES[m].ljust(col)[:col] for m in MODES).rstrip())
        out.append(" | ".join("~" * col for _ in MODES))
        cols = [_wrap(row[m] or "(empty)", col) for m in MODES]
        for i in range(max(len(c) for c in cols)):
            out.append(" | ".join((c[i] if i < len(c) else "").ljust(col) for c in cols).rstrip())
    return "\n".join(out) + "\n"


def cmd_demo(args) -> int:
    t0 = time.monotonic()
    p = ensure_profile(args.profile, args.retrain)
    results = train_demo(p, args.device)
    t_train = time.monotonic() - t0
    _, prompts_path = persona_paths()
    prompts = json.loads(prompts_path.read_text(encoding="utf-8"))
    rows = draft_all(p, prompts, args.max_tokens)
    total = time.monotonic() - t0
    if args.json:
        print(json.dumps({"profile": p.name, "train_seconds": round(t_train, 1), "seconds": round(total, 1),
                          "settings": DEMO_SETTINGS, "stages": [r.__dict__ for r in results], "drafts": rows},
                         ensure_ascii=False, indent=1, default=str))
        return 0
    trained = any(r.status == "ran" for r in results)
    print("Ro is an invented persona (cope_local/data/persona): all lowercase, sailing words, signs 'fair winds, —ro'.")
    print(f"Profile {p.name!r}: {'trained' if trained else 'reused'} in {t_train:.0f} s; "
          f"settings: " + ", ".join(f"{k}={v}" for k, v in DEMO_SETTINGS.items()) + " (demo only).")
    print(side_by_side(rows, args.width), end="")
    print(f"total {total:.0f} s. Try your own: cope draft --profile {p.name} \"Can you fix my sail by Monday?\"")
    return 0
