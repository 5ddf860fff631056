"""ROUGE as the paper scores it, and paired bootstrap confidence intervals for differences between methods.

ROUGE-1 / ROUGE-L F-measure from Google's rouge-score without stemming (the paper's setting), pooled
as the paper pools: the mean over all queries of all users. Per-user means are kept too, because
a mean over queries lets users with many queries dominate.

Two bootstraps of a difference between two methods on the same queries: resampling queries
(the usual paired bootstrap) and resampling users with all their queries (a user-cluster bootstrap:
queries of one user are not independent, so its interval is the honest one when users are few).
Both are seeded: the same rows give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000  # bootstrap resamples (the number)
SEED = 0  # bootstrap seed: reports are reproducible


_scorer = None


def rouge(output: str, reference: str) -> dict[str, float]:
    """{'rouge1': F, 'rougeL': F} of one output against its reference."""
    global _scorer
    if _scorer is None:
        from rouge_score.rouge_scorer import RougeScorer

        _scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    s = _scorer.score(reference, output)  # score(target, prediction)
    return {"rouge1": float(s["rouge1"].fmeasure), "rougeL": float(s["rougeL"].fmeasure)}


def words(text: str) -> int:
    return len(text.split())


@dataclass
class Interval:
    mean: float  # the observed value (not the bootstrap mean)
    low: float  # 2.5th percentile of the bootstrap distribution
    high: float  # 97.5th percentile

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_mean(values, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = 0.95) -> Interval:
    """Percentile CI of the mean of `values` (paired differences, or one method's scores), resampling items."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))  # (R, n)
    means = x[idx].mean(axis=1)  # (R,)
    q = (1 - level) / 2
    return Interval(float(x.mean()), float(np.quantile(means, q)), float(np.quantile(means, 1 - q)))


def bootstrap_clustered(values, clusters, *, resamples: int = RESAMPLES, seed: int = SEED,
                        level: float = 0.95) -> Interval:
    """Percentile CI of the pooled mean when whole clusters (users) are resampled with all their items."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    keys = list(dict.fromkeys(clusters))
    pos = {k: i for i, k in enumerate(keys)}
    cid = np.array([pos[c] for c in clusters])
    sums = np.bincount(cid, weights=x, minlength=len(keys))  # (U,)
    counts = np.bincount(cid, minlength=len(keys)).astype(np.float64)  # (U,)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(keys), size=(resamples, len(keys)))  # (R, U)
    means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)  # (R,) pooled mean over the resampled users' items
    q = (1 - level) / 2
    return Interval(float(x.mean()), float(np.quantile(means, q)), float(np.quantile(means, 1 - q)))


def bootstrap_ratio(numerators, denominators, *, resamples: int = RESAMPLES, seed: int = SEED,
                    level: float = 0.95) -> Interval:
    """Percentile CI of sum(numerators) / sum(denominators) (a ratio of means), resampling items in pairs."""
    a = np.asarray(numerators, dtype=np.float64)
    b = np.asarray(denominators, dtype=np.float64)
    if a.size == 0 or b.sum() == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))  # (R, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = a[idx].sum(axis=1) / b[idx].sum(axis=1)  # (R,)
    q = (1 - level) / 2
    return Interval(float(a.sum() / b.sum()), float(np.nanquantile(ratios, q)), float(np.nanquantile(ratios, 1 - q)))


@dataclass
class MethodSummary:
    method: str
    n: int  # queries scored
    rouge1: float  # pooled mean over queries
    rougeL: float
    rougeL_ci: Interval  # query bootstrap of the pooled ROUGE-L (the chart's error bar)
    words: float  # mean output length in words
    length_ratio: float  # mean output words / mean reference words
    rouge1_ci: Interval  # query bootstrap of the pooled ROUGE-1
    length_ratio_ci: Interval  # query bootstrap of the length ratio (output and reference words resampled together)
    user_rougeL: dict  # user_id -> that user's mean ROUGE-L
    attribution: Interval | None = None  # share of outputs attributed to their own user (style.py), with its CI


def summarize(rows: list[dict], methods: list[str]) -> dict[str, MethodSummary]:
    """Per-method pooled scores from result rows (one row per user, query, method)."""
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        r1 = [r["rouge1"] for r in mine]
        rl = [r["rougeL"] for r in mine]
        per_user: dict[str, list[float]] = {}
        for r in mine:
            per_user.setdefault(r["user_id"], []).append(r["rougeL"])
        ref_words = [words(r["reference"]) for r in mine]
        out_words = [words(r["output"]) for r in mine]
        attr = [r["attr"] for r in mine if "attr" in r]
        out[m] = MethodSummary(m, len(mine), float(np.mean(r1)), float(np.mean(rl)), bootstrap_mean(rl),
                               float(np.mean(out_words)),
                               sum(out_words) / sum(ref_words) if sum(ref_words) else float("nan"),
                               bootstrap_mean(r1), bootstrap_ratio(out_words, ref_words),
                               {u: float(np.mean(v)) for u, v in per_user.items()},
                               bootstrap_mean(attr) if len(attr) == len(mine) else None)
    return out


def paired(rows: list[dict], a: str, b: str, metric: str = "rougeL") -> tuple[Interval, Interval, int] | None:
    """(query bootstrap, user bootstrap, n) of mean(metric of a - metric of b) over queries both methods have."""
    ka = {(r["user_id"], r["query_id"]): r[metric] for r in rows if r["method"] == a}
    kb = {(r["user_id"], r["query_id"]): r[metric] for r in rows if r["method"] == b}
    keys = [k for k in ka if k in kb]
    if not keys:
        return None
    diffs = [ka[k] - kb[k] for k in keys]
    users = [k[0] for k in keys]
    return bootstrap_mean(diffs), bootstrap_clustered(diffs, users), len(keys)
