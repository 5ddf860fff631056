"""Minutes per user per stage of `cope eval run` on K users of a data file.

    python bench/eval.py --data /work/shared/data/LaMP-7/dev.jsonl                 # 2 users, --no-tam
    python bench/eval.py --data F --users 1 --holdout 10 --out /tmp/bench-eval     # any `cope eval run` flag
    python bench/eval.py --data F --tam                                            # with the 2-fold TAMs (slow)

Runs `cope eval run` in a child process (imports and model loads count, as a user sees them), then
reads each user's stage markers (stages/<stage>.json "seconds": 0 for a stage skipped because it
was already done) and the decoding time per method from the run's JSON summary. Work goes to a
temporary folder unless --out is given (the data file is only read). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("inputs", "pairs", "sft", "negatives", "dpo", "export")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--users", type=int, default=2, help="K users (default 2)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--tam", action="store_true", help="train the 2-fold TAMs (default: --no-tam)")
    args, rest = ap.parse_known_args()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-eval-")
        out = Path(tmp.name) / "out"
    else:
        out = Path(args.out)
    env = {**os.environ, "COPE_HOME": os.environ.get("COPE_HOME") or str(out.parent / "cope-home")}
    cmd = [sys.executable, "-m", "cope_local", "eval", "run", "--data", args.data, "--users", str(args.users),
           "--out", str(out), "--json", *([] if args.tam else ["--no-tam"]), *rest]
    print("$ " + " ".join(cmd), file=sys.stderr)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        print(json.dumps({"error": f"cope eval run exited {proc.returncode}"}))
        return proc.returncode
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    per_user = {}
    for u in summary["phases"]["users"]:
        name = u["name"]  # the user's folder under OUT/users
        stages = {}
        for s in STAGES:
            try:
                stages[s] = round(json.loads((out / "users" / name / "stages" / f"{s}.json").read_text())["seconds"] / 60, 2)
            except (OSError, ValueError, KeyError):
                stages[s] = None
        decode = {m: round(sec / 60, 2) for m, sec in u["decode_seconds"].items()}
        per_user[u["user_id"]] = {"stages_min": stages, "decode_min": decode, "queries": u["queries"]}
        print(f"{u['user_id']}: " + ", ".join(f"{s} {v}" for s, v in stages.items())
              + " | decode " + ", ".join(f"{m} {v}" for m, v in decode.items()) + " (minutes)")
    for phase in ("tam",):
        for t in summary["phases"].get(phase, []):
            print(f"tam fold-{t['fold']}: " + ", ".join(f"{s} {round(v['seconds'] / 60, 2)}"
                                                         for s, v in t["stages"].items()) + " (minutes)")
    n = max(1, len(per_user))
    mean_total = sum(sum(v for v in p["stages_min"].values() if v) + sum(p["decode_min"].values())
                     for p in per_user.values()) / n
    print(json.dumps({"users": len(per_user), "wall_min": round(wall / 60, 2), "mean_min_per_user": round(mean_total, 2),
                      "per_user": per_user, "threads": os.environ.get("COPE_THREADS"), "tam": args.tam}))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
