"""Before DPO: how often an adapter already prefers each DPO pair's real text to its negative.

    python bench/saturation.py --out /work/evals/v5crossfit

For every user workspace of a `cope eval run` folder (OUT/users/*/stages) with a negatives.jsonl,
each pair's chosen text (the user's) and rejected text (the mined negative) are scored by the
implicit reward of the negatives stage (mean token log p_adapter - log p_base over the completion,
`negatives.reward`) under the SFT adapter (trained on every pair) and, where the run had
dpo_crossfit, under the crossfit adapter (which never saw these pairs). Accuracy: the share of
pairs with reward(chosen) > reward(rejected); margin: the mean of that difference. An adapter that
is right on nearly every pair before DPO leaves the paper's DPO (reference = the base) little to
learn: the pilot saw 100 %. As a check, the adapter that mined the negatives must reproduce the
rewards stored in negatives.jsonl. Runs with --no-tam only (the amateur is the base). The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def pair_rewards(base: Path, adapter: Path, rows: list[dict]) -> list[tuple[float, float]]:
    """[(reward of the chosen text, reward of the rejected one)] under `adapter`, one per negatives row."""
    from cope_local.decode import Decoder
    from cope_local.train.negatives import PromptScorer, reward

    out = []
    with Decoder(base, adapter) as dec:  # as the negatives stage opens it
        for r in rows:
            scorer = PromptScorer(dec, r["prompt_ids"])
            out.append((reward(scorer.score(r["chosen_ids"])), reward(scorer.score(r["rejected_ids"]))))
    return out


def summary(rewards: list[tuple[float, float]]) -> dict:
    diffs = [c - r for c, r in rewards]
    return {"pairs": len(diffs), "accuracy": sum(d > 0 for d in diffs) / len(diffs),
            "margin": statistics.fmean(diffs), "chosen_reward": statistics.fmean(c for c, _ in rewards)}


def main() -> int:
    from cope_local.train.data import read_pairs_meta
    from cope_local.train.negatives import read_jsonl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a `cope eval run` output folder")
    ap.add_argument("--users", type=int, default=0, help="the first N user folders (default: all)")
    args = ap.parse_args()

    run = json.loads((Path(args.out) / "eval.json").read_text())
    if not run.get("no_tam"):
        print(f"{args.out}: a run with TAMs (its amateur is base + TAM); this script scores against the base, so it "
              "takes a --no-tam run only", file=sys.stderr)
        return 2
    found = sorted(p for p in (Path(args.out) / "users").glob("*/stages") if (p / "negatives.jsonl").exists())
    if args.users:
        found = found[:args.users]
    if not found:
        print(f"{args.out}: no user folder with stages/negatives.jsonl; run `cope eval run` with DPO methods first",
              file=sys.stderr)
        return 2
    pooled: dict[str, list] = {"sft": [], "crossfit": []}
    stored_gap = 0.0
    for stages in found:
        rows = read_jsonl(stages / "negatives.jsonl", what="negatives file")
        base = Path(read_pairs_meta(stages / "pairs.jsonl")["base"])
        miner = "crossfit" if (stages / "crossfit" / "crossfit.gguf").exists() else "sft"
        line = [stages.parent.name]
        for name in ("sft", "crossfit"):
            gguf = stages / name / f"{name}.gguf"
            if not gguf.exists():
                continue
            rewards = pair_rewards(base, gguf, rows)
            pooled[name] += rewards
            if name == miner:  # the miner's rewards were stored by the negatives stage: they must come back
                stored = [(r["chosen"]["reward"], r["candidates"][r["rejected"]]["reward"]) for r in rows]
                stored_gap = max([stored_gap] + [abs(a - b) for x, y in zip(rewards, stored) for a, b in zip(x, y)])
            s = summary(rewards)
            line.append(f"{name} acc {s['accuracy']:.2f} margin {s['margin']:+.3f}")
        print("  ".join(line), file=sys.stderr)
    result = {name: summary(r) for name, r in pooled.items() if r}
    result["users"] = len(found)
    result["stored_reward_max_gap"] = stored_gap
    for name in ("sft", "crossfit"):
        if name in result:
            s = result[name]
            print(f"{name:9s} {s['pairs']} pairs: accuracy {s['accuracy']:.3f}, margin {s['margin']:+.4f}, "
                  f"chosen reward {s['chosen_reward']:+.4f}")
    if "crossfit" in result:
        result["accuracy_ratio_sft_vs_crossfit"] = result["sft"]["accuracy"] / max(result["crossfit"]["accuracy"], 1e-9)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
