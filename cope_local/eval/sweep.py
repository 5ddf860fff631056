"""`cope eval sweep`: CoPe over a grid of decoding settings, decoding only, on the adapters of a run.

The adapters, TAM split and settings come from OUT/eval.json and OUT/users/*/stages (written by
`cope eval run`); nothing is trained. Rows go to the same results.jsonl (cached: a grid point
already decoded is free), and sweep.md gives, per point, CoPe's pooled ROUGE-L and its
difference to OPPU (the SFT adapter decoded alone) with paired bootstrap CIs, its authorship
attribution accuracy (style.py) beside OPPU's, and its length. With more than one grid point it
adds two choices of the point, cross-fitted on halves of the queries (cross_fitted_choice): per
user, and one for everyone (a tuned default, scored on queries it was not tuned on); their rows
go to sweep-per-user.jsonl and sweep-tuned.jsonl (sides for `cope eval compare`). The grid: alpha,
tau (or the mass head_p of the adaptive head set), protect, and for OPPU and the swept row alike the
repetition penalty, no_repeat_ngram and the adapter's weight in the expert.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from cope_local.errors import CopeError, TooFewItems
from cope_local.eval.runner import EvalConfig, out_dir

HINT = "run `cope eval run` first"
PER_USER = "sweep-per-user.jsonl"  # the rows of the per-user choice (written with more than one grid point)
TUNED = "sweep-tuned.jsonl"  # the rows of the one point for everyone, chosen on the other half of the queries


class GridPoint(NamedTuple):
    alpha: float  # contrast weight
    tau: float  # head-set threshold
    protect: str = "none"  # tokens the contrast leaves alone
    rp: float = 1.0  # repetition penalty (oppu and the swept row)
    ngram: int = 0  # no_repeat_ngram (oppu and the swept row)
    scale: float = 1.0  # the user adapter's weight in the expert (oppu and the swept row)
    head_p: float = 0.0  # > 0: the adaptive head set (nucleus of p_user) in place of the tau rule

    @property
    def name(self) -> str:
        return (f"{self.alpha},{self.tau}" + (f",{self.protect}" if self.protect != "none" else "")
                + (f",rp{self.rp:g}" if self.rp != 1.0 else "") + (f",nr{self.ngram}" if self.ngram else "")
                + (f",s{self.scale:g}" if self.scale != 1.0 else "") + (f",hp{self.head_p:g}" if self.head_p else ""))


@dataclass
class SweepJob:
    cfg: EvalConfig
    train: object  # TrainConfig
    user: object  # EvalUser
    grid: list  # [GridPoint]
    method: str = "cope"  # the contrastive row swept: "cope" (DPO adapter) or "oppu+cd" (SFT adapter)


def load_run(data: str, out: str, outputs: str | None = None) -> EvalConfig:
    """The EvalConfig of the run that trained the adapters in OUT."""
    path = Path(out).expanduser().resolve() / "eval.json"
    if not path.exists():
        raise CopeError(f"{path}: no evaluation run in this folder; {HINT} with --out {out}")
    info = json.loads(path.read_text())
    if Path(info["data"]).expanduser().resolve() != Path(data).expanduser().resolve():
        raise CopeError(f"--data {data}: the run in {path.parent} was on {info['data']}; give the same file "
                        f"or {HINT} on this one with another --out")
    keep = {k: info[k] for k in ("data", "outputs", "out", "users", "model", "tau", "max_tokens", "one_paragraph",
                                 "holdout", "no_tam", "max_steps", "device") if k in info}
    keep["out"] = out  # as given now (the folder may have moved since the run)
    return EvalConfig(**keep, methods=("oppu", "cope"), sets=tuple(info.get("sets") or ()))


def sweep_job(job: SweepJob) -> dict:
    from cope_local.eval.generate import generate_user
    from cope_local.eval.results import RESULTS, read_rows, row_key
    from cope_local.eval.runner import (
        decoding_for,
        holdout_queries,
        tam_dir,
        user_adapters,
        user_train_config,
        user_workspace,
    )
    from cope_local.train.pipeline import Pipeline

    cfg, user = job.cfg, job.user
    if not cfg.no_tam and not (tam_dir(cfg, user.fold) / "tam.json").exists():
        raise CopeError(f"{tam_dir(cfg, user.fold)}: the TAM for user {user.user_id} is missing; {HINT}")
    ws = user_workspace(cfg, user)
    try:  # the run skipped a user with too little history (runner._job_user): so does the sweep
        ws.check_size(len(ws.items()), "history items")
    except TooFewItems as e:
        return {"user_id": user.user_id, "generated": 0, "cached": 0, "keys": {p.name: [] for p in job.grid},
                "skipped": str(e)}
    if not (ws.stages_dir / "sft.json").exists():
        raise CopeError(f"{ws.path}: the adapters for user {user.user_id} are missing; {HINT}")
    pipe = Pipeline(ws, user_train_config(cfg, job.train, user), progress=False)
    ad = user_adapters(cfg, pipe, user, need_dpo=job.method == "cope")
    queries = user.queries + holdout_queries(user, ws, pipe.paraphraser)
    results = out_dir(cfg) / RESULTS
    done = {row_key(r) for r in read_rows(results) if r["user_id"] == user.user_id}
    base_dec = decoding_for(cfg, ws.task)
    out = {"user_id": user.user_id, "generated": 0, "cached": 0, "keys": {}}
    for p in job.grid:
        stats = generate_user(user, queries, ("oppu", job.method), ad,
                              replace(base_dec, alpha=p.alpha, tau=p.tau, protect=p.protect, repetition_penalty=p.rp,
                                      no_repeat_ngram=p.ngram, adapter_scale=p.scale, head_p=p.head_p),
                              results, done)
        out["generated"] += stats["generated"]
        out["cached"] += stats["cached"]
        out["keys"][p.name] = [[*k, v] for k, v in stats["keys"].items()]
    return out


def query_half(query_id: str) -> int:
    """0 or 1: a stable split of a user's queries for choosing settings on one half and scoring on the other."""
    return int(hashlib.sha256(str(query_id).encode()).hexdigest()[:8], 16) % 2


def cross_fitted_choice(point_rows: dict[str, list[dict]], method: str, metric: str = "rougeL", *,
                        per_user: bool = True) -> list[dict]:
    """Rows with a grid point chosen by `method`'s metric on the other half of the queries.

    point_rows: grid point name -> its rows (every user, query and method). per_user: for each user
    and half h, the point with the best mean metric of `method` on the user's half 1-h gives all its
    rows of the user's half h. Otherwise one point for everyone per half, chosen on every user's
    half 1-h: what a default picked on this data scores on queries it was not picked on. The
    swept method's rows and OPPU's go alike (OPPU too depends on a point's repetition penalty);
    ties go to the first point of the grid, and an empty other half to the first point. So a
    setting is never chosen on the query it is scored on. Each returned row is a copy with
    `chosen_point` added.
    """
    names = list(point_rows)
    by_point = {name: {(r["user_id"], r["query_id"]): r for r in rows if r["method"] == method}
                for name, rows in point_rows.items()}
    keys = [k for k in by_point[names[0]] if all(k in by_point[n] for n in names)]
    group_of = (lambda k: k[0]) if per_user else (lambda k: "everyone")
    out = []
    for group in dict.fromkeys(group_of(k) for k in keys):
        mine = [k for k in keys if group_of(k) == group]
        for half in (0, 1):
            other = [k for k in mine if query_half(k[1]) != half]
            best = names[0]
            if other:
                means = [sum(by_point[n][k][metric] for k in other) / len(other) for n in names]
                best = names[means.index(max(means))]  # index of the first maximum: ties go to the earlier point
            scored = {k for k in mine if query_half(k[1]) == half}
            out += [{**r, "chosen_point": best} for r in point_rows[best] if (r["user_id"], r["query_id"]) in scored]
    return out


def compare_to_oppu(rows: list[dict], method: str) -> tuple[str, dict] | None:
    """`method` against oppu on the same queries -> (its sweep.md cells after the settings columns,
    its figures for --json); None when the rows hold no pair of them."""
    from cope_local.eval.metrics import paired, summarize

    s = summarize(rows, ["oppu", method])
    diff = paired(rows, method, "oppu", "rougeL")
    if diff is None or method not in s:
        return None
    swept, oppu = s[method], s["oppu"]
    q, u, n = diff
    aq, _au, _ = paired(rows, method, "oppu", "attr")
    cells = (f"{swept.rougeL:.3f} | {oppu.rougeL:.3f} | {q.fmt()} | [{u.low:+.3f}, {u.high:+.3f}] | "
             f"{swept.attribution.mean:.3f} | {oppu.attribution.mean:.3f} | {aq.fmt()} | {swept.words:.1f} | "
             f"{oppu.words:.1f} |")
    figures = {"cope_rougeL": swept.rougeL, "oppu_rougeL": oppu.rougeL, "diff": q.mean, "query_ci": [q.low, q.high],
               "user_ci": [u.low, u.high], "n": n, "cope_attribution": swept.attribution.mean,
               "oppu_attribution": oppu.attribution.mean, "attribution_diff_ci": [aq.low, aq.high],
               "cope_words": swept.words, "oppu_words": oppu.words}
    return cells, figures


def parse_protect(text: str) -> list[str]:
    from cope_local.decode.decoder import PROTECT

    vals = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [v for v in vals if v not in PROTECT]
    if not vals or bad:
        raise CopeError(f"--protect {text!r}: give comma-separated values from {', '.join(PROTECT)}")
    return vals


def parse_ngrams(text: str) -> list[int]:
    return parse_grid(text, "no-repeat-ngram", number=int, high=16)


def parse_grid(text: str, what: str, *, number=float, high: float = 10) -> list:
    """Comma-separated values of --what, each a `number` (float or int) in [0, high]."""
    kind, example = ("whole numbers", "0,3") if number is int else ("numbers", "0.1,0.3")
    try:
        vals = [number(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CopeError(f"--{what} {text!r}: expected comma-separated {kind}, e.g. {example}") from None
    if not vals or any(not (0 <= v <= high) for v in vals):
        raise CopeError(f"--{what} {text!r}: give at least one number between 0 and {high:g}")
    return vals


def run_sweep(data: str, out: str, alphas: list[float], taus: list[float], *, outputs: str | None = None,
              jobs: int = 1, command: str = "", protects: list[str] = ("none",), users: int | None = None,
              method: str = "cope", penalties: list[float] = (1.0,), ngrams: list[int] = (0,),
              scales: list[float] = (1.0,), head_ps: list[float] = (0.0,)) -> dict:
    from cope_local.eval.results import RESULTS, latest, read_rows, repair_tail, write_rows
    from cope_local.eval.runner import run_jobs, select_users, train_config
    from cope_local.paths import atomic_write_text

    t0 = time.monotonic()
    from cope_local.eval.report import attributor_for, mark_attribution

    cfg = load_run(data, out, outputs)
    if users is not None:
        cfg.users = users
    everyone, selected = select_users(cfg)
    attributor = attributor_for(everyone)
    train = train_config(cfg)
    grid = [GridPoint(a, t, p, r, n, s, h) for a in alphas for t in taus for p in protects for r in penalties
            for n in ngrams for s in scales for h in head_ps]
    repair_tail(out_dir(cfg) / RESULTS)
    if method not in ("cope", "oppu+cd"):
        raise CopeError(f"--method {method!r}: sweep cope or oppu+cd")
    res = run_jobs([SweepJob(cfg, train, u, grid, method) for u in selected], jobs, fn=sweep_job)
    rows_all = read_rows(out_dir(cfg) / RESULTS)
    tam = "none (--no-tam)" if cfg.no_tam else "2-fold split (see table.md)"
    skipped = {r["user_id"]: r["skipped"] for r in res if r.get("skipped")}
    lines = ["# cope eval sweep", "", f"- command: `{command}`",
             f"- data: {cfg.data}; users: {len(selected) - len(skipped)}; TAM: {tam}",
             *[f"- skipped: {u} ({why})" for u, why in skipped.items()], "",
             f"- swept: {method} against oppu (the SFT adapter decoded alone)", "",
             ("| alpha | tau | head p | protect | rep. penalty | no-repeat n | adapter scale | CoPe ROUGE-L | OPPU ROUGE-L "
              "| CoPe - OPPU (query CI) | (user CI) | CoPe attribution | OPPU attribution "
              "| attribution CoPe - OPPU (query CI) | CoPe words | OPPU words |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    points, point_rows = {}, {}
    for p in grid:
        name = p.name
        keys = {(k[0], k[1], k[2]): k[3] for r in res for k in r["keys"][name]}
        rows = latest(rows_all, keys)
        mark_attribution(rows, attributor)
        compared = compare_to_oppu(rows, method)
        if compared is None:
            continue
        point_rows[name] = rows
        cells, points[name] = compared
        lines.append(f"| {p.alpha:g} | {p.tau:g} | {p.head_p or 'off'} | {p.protect} | {p.rp:g} | {p.ngram or 'off'} | {p.scale:g} | {cells}")
        points[name] |= {"alpha": p.alpha, "tau": p.tau, "protect": p.protect, "repetition_penalty": p.rp,
                         "no_repeat_ngram": p.ngram, "adapter_scale": p.scale, "head_p": p.head_p}
    if len(point_rows) > 1:  # the grid point chosen on the other half of the queries, per user and for everyone
        notes = []  # below the table, one paragraph per choice
        for name, per_user, file, label, how in (
                ("per-user", True, PER_USER, "per user", "each user's point is the one with the best mean ROUGE-L "
                 "on the other half of that user's queries"),
                ("tuned", False, TUNED, "tuned", "one point for every user, the one with the best mean ROUGE-L on "
                 "the other half of every user's queries: what a default tuned on this data scores on queries it "
                 "was not tuned on")):
            chosen = cross_fitted_choice(point_rows, method, per_user=per_user)
            write_rows(out_dir(cfg) / file, chosen)
            cells, points[name] = compare_to_oppu(chosen, method)
            picks = sorted({r["chosen_point"] for r in chosen})
            points[name]["points_chosen"] = picks
            lines.append(f"| {label} | {label} | | | | | | {cells}")
            notes += ["", f"{label}: {how} (2-fold, halves by hash of the query id), so no query is scored under a "
                          f"setting chosen on itself; points chosen: {', '.join(picks)}; its rows: {file} (a side for "
                          f"`cope eval compare {cfg.out}/{file}:{method}`)"]
        lines += notes
    atomic_write_text(out_dir(cfg) / "sweep.md", "\n".join(lines) + "\n", mode=0o644)
    return {"out": str(out_dir(cfg)), "users": len(selected) - len(skipped), "skipped": skipped,
            "generated": sum(r["generated"] for r in res),
            "cached": sum(r["cached"] for r in res), "points": points, "seconds": round(time.monotonic() - t0, 1)}

