"""table.md (laid out like the paper's Table 1) and rougeL.png from the rows of one run.

Only the rows whose settings key this run asked for are reported, so an older run's rows in the
same results.jsonl (other alpha, other adapters) never mix into the numbers.
"""

from __future__ import annotations

import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from cope_local.eval.metrics import RESAMPLES, SEED, Interval, bootstrap_mean, paired, summarize
from cope_local.paths import atomic_path, atomic_write_text

COMPARISONS = (("cope", "oppu"), ("cope", "tam"))  # differences with CIs under the table (the two)
# ROUGE-L differences split by query kind: each step of the method against the one before it
KIND_COMPARISONS = (("cope", "oppu"), ("oppu", "base"), ("cope", "base"), ("oppu+dpo", "oppu"), ("oppu+cd", "oppu"))


def report_rows(cfg, keys: dict) -> list[dict]:
    from cope_local.eval.results import RESULTS, latest, read_rows
    from cope_local.eval.runner import out_dir

    return latest(read_rows(out_dir(cfg) / RESULTS), keys)


def attributor_for(users):
    """The style classifier (style.py) trained on every user's training history only (held-out
    items removed), so no reference it is checked on was seen in training."""
    from cope_local.eval.style import Attributor

    return Attributor({u.user_id: [item.output for item in u.history] for u in users})


def mark_attribution(rows: list[dict], attributor) -> None:
    """Set attr = 1.0 on each row whose output reads as its own user's, else 0.0."""
    for r in rows:
        r["attr"] = float(attributor.correct(r["user_id"], r["output"]))


def attribute(rows: list[dict], everyone) -> Interval:
    """mark_attribution with a classifier of `everyone`; -> the same accuracy on the real
    references (the metric's ceiling on these queries)."""
    attributor = attributor_for(everyone)
    mark_attribution(rows, attributor)
    refs = {(r["user_id"], r["query_id"]): r["reference"] for r in rows}
    return bootstrap_mean([float(attributor.correct(u, text)) for (u, _q), text in refs.items()])


def _ci_lines(rows: list[dict], comparisons) -> tuple[list[str], dict]:
    lines, data = [], {}
    for a, b in comparisons:
        for metric in ("rougeL", "rouge1", "attr"):
            res = paired(rows, a, b, metric)
            if res is None:
                continue
            q, u, n = res
            lines.append(f"- {a} - {b}, {metric}: {q.fmt()} (query bootstrap, n = {n} queries); "
                         f"{u.fmt()} (user bootstrap)")
            data[f"{a}-{b}:{metric}"] = {"mean": q.mean, "query_ci": [q.low, q.high], "user_ci": [u.low, u.high],
                                         "n": n}
    return lines, data


def kind_lines(rows: list[dict], comparisons=KIND_COMPARISONS) -> list[str]:
    """ROUGE-L differences over all queries and per query kind (the benchmark's own queries vs items
    held out of the profiles: their inputs are made differently, so their gains can differ), and how
    many outputs the two methods share (a contrast that changes no token cannot change a score)."""
    kinds = sorted({r["query_kind"] for r in rows})
    if len(kinds) < 2:
        return []
    lines = ["", "ROUGE-L differences by query kind (query bootstrap, 95 % CI; n = paired queries):", "",
             "| difference | all | " + " | ".join(kinds) + " | same output |", "|---" * (len(kinds) + 3) + "|"]
    for a, b in comparisons:
        cells = []
        for kind in (None, *kinds):
            res = paired([r for r in rows if kind is None or r["query_kind"] == kind], a, b)
            cells.append(f"{res[0].fmt()} (n = {res[2]})" if res else "n/a")
        if cells[0] == "n/a":
            continue
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + f" | {same_outputs(rows, a, b)} |")
    return lines


def same_outputs(rows: list[dict], a: str, b: str) -> int:
    """How many queries methods a and b answer with the same text."""
    out_b = {(r["user_id"], r["query_id"]): r["output"] for r in rows if r["method"] == b}
    return sum(1 for r in rows if r["method"] == a and out_b.get((r["user_id"], r["query_id"])) == r["output"])


def write_report(cfg, keys: dict, users, everyone=None, skipped: dict | None = None) -> dict:
    """Write table.md and rougeL.png; return the numbers for the JSON summary.
    everyone: all users of the file (the attribution classifier's training set); None = `users`.
    skipped: {user_id: why} for users with too little history to train on."""
    from cope_local.eval.runner import out_dir

    rows = report_rows(cfg, keys)
    ceiling = attribute(rows, everyone or users) if len(everyone or users) >= 2 and rows else None
    methods = [m for m in cfg.methods if any(r["method"] == m for r in rows)]
    summary = summarize(rows, methods)
    ci_lines, cis = _ci_lines(rows, COMPARISONS)
    settings = next((r["settings"] for r in rows if r["settings"].get("mode") == "cope"), rows[0]["settings"] if rows else {})
    user_ids = list(dict.fromkeys(r["user_id"] for r in rows))
    n_queries = len({(r["user_id"], r["query_id"]) for r in rows})
    n_held = len({(r["user_id"], r["query_id"]) for r in rows if r["query_kind"] == "holdout"})
    decoding = (f"greedy, max tokens {settings.get('max_tokens')}, alpha {settings.get('alpha', cfg.alpha)}, "
                f"tau {settings.get('tau', cfg.tau)}" + (", each output ends at its first blank line"
                                                         if settings.get("one_paragraph") else ""))
    rouge_note = (f"rouge-score, F-measure, no stemming, mean over all queries; CIs: {RESAMPLES} bootstrap "
                  f"resamples (seed {SEED}), 95 % percentile")
    split = ("none (--no-tam): the amateur is the raw base, and `tam` equals `base`" if cfg.no_tam else
             "2-fold by sha256(user_id) mod 2: fold A users use a TAM trained on fold B users' histories "
             "(all of the file's fold-B users, their held-out items excluded) and vice versa")
    lines = [
        "# cope eval", "",
        f"- command: `{cfg.command}`",
        f"- date: {datetime.now(timezone.utc).replace(microsecond=0).isoformat()}",
        f"- data: {cfg.data}" + (f" + {cfg.outputs}" if cfg.outputs else ""),
        f"- model: {settings.get('model', cfg.model or 'default')}",
        f"- users: {len(user_ids)}; queries: {n_queries} ({n_held} held out from profiles, --holdout {cfg.holdout}"
        + ("; not those whose made input holds the whole text: it would give the answer away)" if cfg.holdout else ")"),
        *[f"- skipped: {u} ({why})" for u, why in (skipped or {}).items()],
        f"- TAM split: {split}",
        f"- decoding: {decoding}",
        f"- ROUGE: {rouge_note}", "",
        f"- style: authorship attribution accuracy (`cope_local/eval/style.py`: character 1-4-gram TF-IDF "
        f"centroids of all {len(everyone or users)} users' training histories; chance = 1/{len(everyone or users)}); "
        f"the real texts of these queries score " + (ceiling.fmt() if ceiling else "n/a"), "",
        ("| method | ROUGE-1 | ROUGE-1 95 % CI | ROUGE-L | ROUGE-L 95 % CI | attribution | attribution 95 % CI | words "
         "| length ratio | length ratio 95 % CI |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = summary[m]
        a = s.attribution
        lines.append(f"| {m} | {s.rouge1:.3f} | {ci(s.rouge1_ci)} | {s.rougeL:.3f} | {ci(s.rougeL_ci)} | "
                     + (f"{a.mean:.3f} | {ci(a)}" if a else "n/a | n/a")
                     + f" | {s.words:.1f} | {s.length_ratio:.2f} | {ci(s.length_ratio_ci, 2)} |")
    if ceiling:
        lines.append(f"| (real texts) | 1.000 | | 1.000 | | {ceiling.mean:.3f} | {ci(ceiling)} | | 1.00 | |")
    lines += ["", "Differences (mean over paired queries, 95 % CI):", ""] + (ci_lines or [
        "- (cope - oppu and cope - tam need the cope method and oppu or tam; the table below pairs what was run)"])
    lines += kind_lines(rows)
    lines += ["", "Per-user ROUGE-L:", "", "| user | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for u in user_ids:
        lines.append(f"| {u} | " + " | ".join(f"{summary[m].user_rougeL.get(u, float('nan')):.3f}" for m in methods) + " |")
    out = out_dir(cfg)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n", mode=0o644)
    chart(summary, methods, out / "rougeL.png", title=f"ROUGE-L, {len(user_ids)} users, {n_queries} queries")
    return {"methods": {m: method_json(summary[m]) for m in methods},
            "attribution_of_real_texts": ceiling.mean if ceiling else None, "differences": cis}


def method_json(s) -> dict:
    """One method's pooled scores and their 95 % CIs ([low, high]) for --json."""
    a = s.attribution
    return {"rouge1": s.rouge1, "rouge1_ci": [s.rouge1_ci.low, s.rouge1_ci.high],
            "rougeL": s.rougeL, "rougeL_ci": [s.rougeL_ci.low, s.rougeL_ci.high],
            "attribution": a.mean if a else None, "attribution_ci": [a.low, a.high] if a else None,
            "words": s.words, "length_ratio": s.length_ratio,
            "length_ratio_ci": [s.length_ratio_ci.low, s.length_ratio_ci.high], "n": s.n}


def ci(interval, digits: int = 3) -> str:
    """[low, high] of an interval, for a table cell."""
    return f"[{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def chart(summary: dict, methods: list[str], path: Path, title: str = "ROUGE-L") -> Path | None:
    """Bar chart of pooled ROUGE-L per method with its bootstrap 95 % CI (matplotlib, Agg, imported here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path}: matplotlib is not installed; no chart (pip install matplotlib)", file=sys.stderr)
        return None
    vals = [summary[m].rougeL for m in methods]
    err = [[max(0.0, v - summary[m].rougeL_ci.low) for m, v in zip(methods, vals)],
           [max(0.0, summary[m].rougeL_ci.high - v) for m, v in zip(methods, vals)]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(methods) + 1), 3.6), dpi=120)
    ax.bar(methods, vals, yerr=err, capsize=4, color="#4c72b0")
    for i, v in enumerate(vals):
        ax.text(i, v / 2, f"{v:.3f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_ylabel("ROUGE-L (95 % CI)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max([0.05] + [h for h in (summary[m].rougeL_ci.high for m in methods) if math.isfinite(h)]) * 1.15)
    fig.tight_layout()
    with atomic_path(path, 0o644) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
