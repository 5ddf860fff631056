"""Time each personalization stage for a 100-item history on the default model; peak RSS per stage.

    python bench/train.py                                   # the demo persona, cycled to 100 items (email-reply)
    python bench/train.py --lamp7 /work/shared/data/LaMP-7/dev.jsonl   # 100 real tweets of LaMP-7 dev users (lamp7)
    python bench/train.py --set user.epochs=1 --keep /tmp/b # any training setting; keep the work folder

Each stage runs as `cope profile train NAME --stages S` in a fresh process (so
every time includes its imports and model loads, as a user sees them), and
its peak RSS comes from the kernel's accounting of that child (wait4). The
data is read from the given path and written only into a temporary
COPE_HOME, never into the repository. The HF copy of the base (built once
per machine, see cope_local/train/hf.py) is built inside that home too
unless COPE_CACHE is set, and its cost lands in the `pairs` stage. The last
line is one JSON object. Target (issue 4): sft + negatives + dpo <= 300 s,
peak RSS <= 3 GB, on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("inputs", "pairs", "sft", "negatives", "dpo", "export", "activate")
TARGET_SECONDS = 300  # sft + negatives + dpo
TARGET_RSS_MB = 3072


def persona_rows(n: int) -> list[dict]:
    """The demo persona's 40 replies, cycled to n; repeats get a numbered input so none is deduplicated."""
    path = ROOT / "cope_local" / "data" / "persona" / "history.jsonl"
    base = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = []
    for k in range(n):
        r = base[k % len(base)]
        lap = k // len(base)
        rows.append({"input": r["input"] + (f" (again, #{lap + 1})" if lap else ""), "output": r["output"]})
    return rows


def lamp7_rows(path: Path, n: int) -> list[dict]:
    """n profile tweets of LaMP-7 dev users, in file order (users taken whole until n is reached)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for item in json.loads(line).get("profile", []):
                text = (item.get("text") or "").strip()
                if text:
                    rows.append({"output": text})
                if len(rows) == n:
                    return rows
    if len(rows) < n:
        raise SystemExit(f"{path}: only {len(rows)} tweets, wanted {n}")
    return rows


def run_stage_rusage(name: str, stage: str, env: dict, extra: list[str]) -> dict:
    """Run one stage in a child; wall time and the child's own peak RSS (ru_maxrss of wait4)."""
    cmd = [sys.executable, "-m", "cope_local", "profile", "train", name, "--stages", stage, *extra]
    with tempfile.TemporaryFile("w+") as errf:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errf, text=True)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - t0
        errf.seek(0)
        err = errf.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"stage {stage} failed (exit {code})")
    peak_mb = usage.ru_maxrss / 1024 if platform.system() == "Linux" else usage.ru_maxrss / 2**20
    lines = [x for x in err.splitlines() if x.startswith((f"{stage}:", "tam:"))]
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "log": lines[-2:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100, help="history size (default 100)")
    ap.add_argument("--lamp7", type=Path, help="LaMP-7 dev.jsonl: use real tweets (task lamp7) instead of the persona")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to time, in order (default all)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="training setting KEY=VALUE (repeatable)")
    ap.add_argument("--keep", type=Path, help="use this folder as COPE_HOME and keep it (default: a temp folder)")
    ap.add_argument("--resume", action="store_true",
                    help="with --keep: reuse the profile there (finished stages are skipped, an interrupted one resumes)")
    args = ap.parse_args()

    home = args.keep or Path(tempfile.mkdtemp(prefix="cope-bench-train-"))
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COPE_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    rows = lamp7_rows(args.lamp7, args.items) if args.lamp7 else persona_rows(args.items)
    task = "lamp7" if args.lamp7 else "email-reply"
    data = home / "bench-history.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    name = "bench"
    if not (args.resume and (home / "profiles" / name / "profile.toml").exists()):
        shutil.rmtree(home / "profiles" / name, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "cope_local", "profile", "create", name, "--from", str(data), "--task", task],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    extra = ["--dpo"] + [x for s in args.sets for x in ("--set", s)]  # every stage the target names (dpo is opt-in)
    print(f"bench: {len(rows)} items ({'LaMP-7 dev' if args.lamp7 else 'persona, cycled'}), task {task}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; COPE_HOME={home}", flush=True)
    results = {}
    t_all = time.monotonic()
    for stage in args.stages.split(","):
        r = run_stage_rusage(name, stage, env, extra)
        results[stage] = r
        print(f"{stage:<10} {r['seconds']:7.1f} s  cpu {r['cpu_seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:5d} MB  "
              + " / ".join(r["log"]), flush=True)
    core = sum(results[s]["seconds"] for s in ("sft", "negatives", "dpo") if s in results)
    peak = max(r["peak_rss_mb"] for r in results.values())
    summary = {
        "bench": "train", "resumed": bool(args.resume), "items": len(rows), "source": "lamp7" if args.lamp7 else "persona", "task": task,
        "cpus": os.cpu_count(), "load_avg_end": round(os.getloadavg()[0], 2), "settings": args.sets,
        "stages": {k: {"seconds": v["seconds"], "cpu_seconds": v["cpu_seconds"], "peak_rss_mb": v["peak_rss_mb"]}
                   for k, v in results.items()},
        "sft_negatives_dpo_seconds": round(core, 1), "total_seconds": round(time.monotonic() - t_all, 1),
        "peak_rss_mb": peak, "target_seconds": TARGET_SECONDS, "target_rss_mb": TARGET_RSS_MB,
        "meets_target": core <= TARGET_SECONDS and peak <= TARGET_RSS_MB,
    }
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
