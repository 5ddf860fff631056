"""`cope eval run`: train per user with the pipeline, decode every query by every method, report.

    OUT/
      eval.json                what was run (read by `cope eval sweep`)
      results.jsonl            one row per generation (results.py)
      table.md, rougeL.png     the report (report.py)
      users/<user>/            a profile-kind pipeline Workspace: items.jsonl, stages/, adapters/
      tams/fold-A|B/           TAM workspaces: fold A's users use the TAM trained on fold B's histories

Phases, each a list of independent jobs (run in `--jobs` spawned processes):
  1. `inputs` for every user whose history is needed (evaluated users, and under a TAM the other
     fold's users too): paraphrased inputs are made once per user and shared with the TAM;
  2. one TAM per fold, on the other fold's inputs (no new paraphrasing);
  3. per evaluated user: pairs, sft, negatives, dpo, export, then generation.
Every stage is the pipeline's (cope_local/train/pipeline.py), so finished work is skipped and an
interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cope_local.errors import CopeError, TooFewItems
from cope_local.eval.data import FOLDS, EvalUser, Query, fold_of, load_users, other_fold
from cope_local.eval.generate import METHODS, Adapters, Decoding
from cope_local.paths import atomic_write_text

USER_STAGES = ("inputs", "pairs", "sft", "crossfit", "negatives", "dpo", "export")  # no `activate`: eval decodes by path


@dataclass
class EvalConfig:
    data: str  # users JSONL, or LaMP's questions JSON (with outputs)
    outputs: str | None = None  # LaMP's outputs JSON; None = data holds the references
    out: str = "eval-out"  # output folder (relative to the current directory)
    users: int | None = None  # evaluate the first N users of the file; None = all
    methods: tuple = METHODS  # which rows to generate
    model: str | None = None  # base model name or .gguf; None = the default (smollm2-135m)
    alpha: float | None = None  # CoPe alpha; None = the task's default (lamp7: 0.7)
    tau: float | None = None  # head set threshold; None = the task's default (the paper's 0.1; lamp7: 0.3)
    max_tokens: int | None = None  # new tokens per output; None = the task's cap (lamp7: 64)
    one_paragraph: bool = False  # every output ends at its first blank line (Decoding.one_paragraph)
    holdout: int = 0  # last N profile items per user become extra queries (and leave the training history)
    no_tam: bool = False  # amateur = the raw base (much cheaper: no TAM training)
    jobs: int = 1  # users in parallel (spawned processes)
    sets: tuple = ()  # --set KEY=VALUE training overrides
    max_steps: int | None = None  # cap per training stage
    device: str | None = None  # training device; None = auto
    command: str = ""  # the command line, for the report
    progress: bool = False  # per-step training bars on stderr (noisy with --jobs)


@dataclass
class Job:
    kind: str  # "inputs" | "tam" | "user"
    cfg: EvalConfig
    train: object  # TrainConfig
    user: EvalUser | None = None
    fold: str = ""
    tam_users: list = field(default_factory=list)  # user names whose inputs make this fold's TAM


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def out_dir(cfg: EvalConfig) -> Path:
    return Path(cfg.out).expanduser().resolve()


# ---- workspaces ------------------------------------------------------------------------------------

def user_workspace(cfg: EvalConfig, user: EvalUser):
    """OUT/users/<name>: a profile-kind Workspace (an in-memory Profile; nothing under the user's profiles)."""
    from cope_local.ingest import write_items
    from cope_local.profile import Profile
    from cope_local.tasks import get_task
    from cope_local.train.tam import Workspace

    path = out_dir(cfg) / "users" / user.name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_items_if_changed(path / "items.jsonl", user.history, write_items)
    prof = Profile(name=user.name, path=path, task=user.task, model=cfg.model)
    return Workspace("profile", user.name, path, get_task(user.task), cfg.model, prof)


def tam_dir(cfg: EvalConfig, fold: str) -> Path:
    return out_dir(cfg) / "tams" / f"fold-{fold}"


def _write_items_if_changed(path: Path, items, write_items) -> None:
    text = "".join(json.dumps(i.to_dict(), ensure_ascii=False) + "\n" for i in items)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_items(path, items)


def tam_label(cfg: EvalConfig, user: EvalUser) -> str:
    if cfg.no_tam:
        return "none (--no-tam: amateur = base)"
    return f"fold {user.fold} (TAM tams/fold-{user.fold}, trained on fold {other_fold(user.fold)}'s users)"


# ---- jobs (top-level functions: picklable for spawned workers) -----------------------------------

def _init_worker(threads: int) -> None:
    os.environ["COPE_THREADS"] = str(threads)
    os.environ["COPE_EVAL_WORKER"] = "1"


class _PrefixedLines:
    """A text stream that starts each line with `prefix` (unless the line already does): with --jobs, the
    stages' own progress lines (negatives, dpo) of several users interleave on one stderr."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for part in text.splitlines(keepends=True):
            lead = "\r" if part.startswith("\r") else ""  # a progress line redrawn in place keeps its prefix
            if self.at_line_start and not part[len(lead):].startswith(self.prefix.strip()):
                part = lead + self.prefix + part[len(lead):]
            out.append(part)
            self.at_line_start = part.endswith(("\n", "\r"))
        self.stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):  # flush, isatty, fileno...: the wrapped stream's
        return getattr(self.stream, name)


def run_job(job: Job) -> dict:
    fn = {"inputs": _job_inputs, "tam": _job_tam, "user": _job_user}[job.kind]
    if not os.environ.get("COPE_EVAL_WORKER"):
        return fn(job)
    who = f"tam fold-{job.fold}" if job.kind == "tam" else job.user.user_id  # a TAM job's user is only its task's
    stderr, sys.stderr = sys.stderr, _PrefixedLines(sys.stderr, f"[{who}] ")
    try:
        return fn(job)
    finally:
        sys.stderr = stderr


def _stage_info(results) -> dict:
    return {r.stage: {"status": r.status, "seconds": round(r.seconds, 2)} for r in results}


def _job_inputs(job: Job) -> dict:
    from cope_local.train.pipeline import Pipeline

    ws = user_workspace(job.cfg, job.user)
    log = lambda m: _log(f"[{job.user.user_id}] {m}")
    try:
        res = Pipeline(ws, job.train.updated({"tam_adapter": ""}), progress=job.cfg.progress, log=log).run(["inputs"])
    except TooFewItems as e:  # as in _job_user: skipped, and run_eval drops it from the TAMs' donors
        log(f"skipped: {e}")
        return {"user_id": job.user.user_id, "stages": {}, "skipped": str(e)}
    return {"user_id": job.user.user_id, "stages": _stage_info(res)}


def _job_tam(job: Job) -> dict:
    """Fold F's TAM: the pipeline's TAM stages on the other fold's users' inputs (already paraphrased)."""
    from cope_local.ingest import read_items, write_items
    from cope_local.tasks import get_task
    from cope_local.train.pipeline import Pipeline
    from cope_local.train.tam import Workspace

    path = tam_dir(job.cfg, job.fold)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    items, seen = [], set()
    for name in job.tam_users:
        for item in read_items(out_dir(job.cfg) / "users" / name / "stages" / "inputs.jsonl"):
            if item.id not in seen:
                seen.add(item.id)
                items.append(item)
    task = get_task(job.user.task)
    _write_items_if_changed(path / "items.jsonl", items, write_items)
    atomic_write_text(path / "tam.toml", f"# cope eval: TAM for fold {job.fold} users, trained on fold "
                                         f"{other_fold(job.fold)}: {', '.join(job.tam_users)}\n")
    ws = Workspace("tam", f"fold-{job.fold}", path, task, job.cfg.model)
    log = lambda m: _log(f"[tam fold-{job.fold}] {m}")
    res = Pipeline(ws, job.train, progress=job.cfg.progress, log=log).run()
    return {"fold": job.fold, "items": len(items), "users": len(job.tam_users), "stages": _stage_info(res)}


def user_train_config(job_cfg: EvalConfig, train, user: EvalUser):
    # dpo on: the DPO stages run when a method needs them (run_user picks the stages), whatever the default
    return train.updated({"tam_adapter": "" if job_cfg.no_tam else str(tam_dir(job_cfg, user.fold)), "dpo": True})


def holdout_queries(user: EvalUser, ws, paraphraser: Path) -> list[Query]:
    """Held-out items as queries, their inputs made as the `inputs` stage makes training inputs.
    An item whose made input holds the whole text (the base model copied it, or refused and the text
    stood in) is not a query: its input would give the answer away. Training keeps such items."""
    from cope_local.tasks.registry import gives_away
    from cope_local.train.paraphrase import Paraphraser

    if not user.holdout:
        return []
    task = ws.task
    need = sum(task.needs_generated_input(i) for i in user.holdout)
    with Paraphraser(paraphraser, ws.path / "holdout.generated.jsonl", total=need, progress=False) as para:
        made = task.make_inputs(user.holdout, para if need else None)
    return [Query(f"holdout-{i.id}", task.training_pair(i)[0][-1]["content"], i.output, "holdout") for i in made
            if not gives_away(i.input or "", i.output)]


def user_adapters(job_cfg: EvalConfig, pipe, user: EvalUser, need_dpo: bool) -> Adapters:
    """The GGUFs a user's rows decode with, from the stage markers; CopeError if training has not run."""
    hint = "run `cope eval run` first with the same --data, --out, --holdout and --no-tam"
    ad = Adapters(base=pipe.base, tam=pipe.tam.gguf if pipe.tam else None, tam_key=pipe.tam.key if pipe.tam else "",
                  tam_split=tam_label(job_cfg, user))
    sft = pipe.read_marker("sft")
    if sft.get("state") != "done" or not pipe.p("sft_gguf").exists():
        raise CopeError(f"{pipe.ws.path}: no trained SFT adapter for user {user.user_id}; {hint}")
    ad.files["sft"], ad.keys["sft"] = pipe.p("sft_gguf"), sft["key"]
    if need_dpo:
        exp = pipe.read_marker("export")
        path = pipe.ws.path / (exp.get("info") or {}).get("adapter", ".none")
        if exp.get("state") != "done" or not path.exists():
            raise CopeError(f"{pipe.ws.path}: no exported DPO adapter for user {user.user_id}; {hint}")
        ad.files["dpo"], ad.keys["dpo"] = path, exp["key"]
    return ad


def decoding_for(cfg: EvalConfig, task) -> Decoding:
    return Decoding(alpha=task.default_alpha if cfg.alpha is None else cfg.alpha,
                    tau=task.default_tau if cfg.tau is None else cfg.tau,
                    max_tokens=cfg.max_tokens or task.max_new_tokens, one_paragraph=cfg.one_paragraph)


def _job_user(job: Job, train_stages: bool = True) -> dict:
    from cope_local.eval.generate import METHOD_SPEC, generate_user
    from cope_local.eval.results import RESULTS, read_rows, row_key
    from cope_local.train.pipeline import Pipeline

    cfg, user = job.cfg, job.user
    log = lambda m: _log(f"[{user.user_id}] {m}")
    ws = user_workspace(cfg, user)
    pipe = Pipeline(ws, user_train_config(cfg, job.train, user), progress=cfg.progress, log=log)
    need_dpo = any(METHOD_SPEC[m][0] == "dpo" for m in cfg.methods)
    stages = {}
    if train_stages:
        wanted = list(USER_STAGES) if need_dpo else ["inputs", "pairs", "sft"]
        try:
            stages = _stage_info(pipe.run(wanted))
        except TooFewItems as e:  # one user's tiny history must not stop the other users' run
            log(f"skipped: {e}")
            return {"user_id": user.user_id, "name": user.name, "fold": user.fold, "queries": 0, "stages": {},
                    "generated": 0, "cached": 0, "keys": [], "skipped": str(e)}
    ad = user_adapters(cfg, pipe, user, need_dpo)
    queries = user.queries + holdout_queries(user, ws, pipe.paraphraser)
    results = out_dir(cfg) / RESULTS
    done = {row_key(r) for r in read_rows(results) if r["user_id"] == user.user_id}
    stats = generate_user(user, queries, cfg.methods, ad, decoding_for(cfg, ws.task), results, done, log=log)
    stats["keys"] = [[*k, v] for k, v in stats["keys"].items()]
    return {"user_id": user.user_id, "name": user.name, "fold": user.fold, "queries": len(queries), "stages": stages,
            **stats}


def largest_first(jobs: list) -> list[int]:
    """Job indices by decreasing size (a user's history items: training and mining scale with them);
    ties keep the file's order."""
    size = lambda job: len(job.user.history) if job.user is not None else 0
    return sorted(range(len(jobs)), key=lambda i: -size(jobs[i]))


def run_jobs(jobs: list, n: int, fn=run_job) -> list[dict]:
    """fn(job) for each job, results in the jobs' order: in this process when n == 1, else in n spawned
    processes (COPE_THREADS = cores // n) that take the largest jobs first, so a long user that comes
    last in the file does not run alone at the end while the other workers sit idle."""
    if n <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // n)
    with ProcessPoolExecutor(max_workers=min(n, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {i: pool.submit(fn, jobs[i]) for i in largest_first(jobs)}
        return [futures[i].result() for i in range(len(jobs))]


# ---- the whole run ------------------------------------------------------------------------------------

def select_users(cfg: EvalConfig) -> tuple[list[EvalUser], list[EvalUser]]:
    """(every user of the file, the evaluated ones: the first --users N)."""
    users = load_users(cfg.data, cfg.outputs, holdout=cfg.holdout)
    if cfg.users is not None and cfg.users < 1:
        raise CopeError(f"--users {cfg.users}: must be at least 1")
    return users, users[: cfg.users] if cfg.users else users


def train_config(cfg: EvalConfig):
    from cope_local.train.settings import load_config

    return load_config(None, sets=cfg.sets, device=cfg.device, max_steps=cfg.max_steps)


def write_run_info(cfg: EvalConfig, selected: list[EvalUser]) -> None:
    out = out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    info = {**asdict(cfg), "methods": list(cfg.methods), "sets": list(cfg.sets),
            "users_evaluated": [u.user_id for u in selected],
            "folds": {u.user_id: fold_of(u.user_id) for u in selected},
            "written": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    atomic_write_text(out / "eval.json", json.dumps(info, indent=1) + "\n", mode=0o644)


def run_eval(cfg: EvalConfig) -> dict:
    """Train, generate, report; returns the JSON summary (`generated` = rows decoded in this run)."""
    from cope_local.eval.report import write_report
    from cope_local.eval.results import RESULTS, repair_tail

    t0 = time.monotonic()
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise CopeError(f"--methods {','.join(unknown)}: unknown; choose from {','.join(METHODS)}")
    everyone, selected = select_users(cfg)
    train = train_config(cfg)
    write_run_info(cfg, selected)
    repair_tail(out_dir(cfg) / RESULTS)
    phases: dict = {}
    folds = [] if cfg.no_tam else [f for f in FOLDS if any(u.fold == f for u in selected)]
    donors = {f: [u for u in everyone if u.fold == other_fold(f)] for f in folds}
    for f in folds:
        if not donors[f]:
            raise CopeError(f"{cfg.data}: no user falls in fold {other_fold(f)}, so fold {f}'s TAM has no data; "
                            "use more users or --no-tam")
    prep = list({u.user_id: u for u in selected + [u for f in folds for u in donors[f]]}.values())
    if folds:  # users' inputs first: the TAMs are trained on them
        phases["inputs"] = run_jobs([Job("inputs", cfg, train, u) for u in prep], cfg.jobs)
        too_few = {r["user_id"] for r in phases["inputs"] if r.get("skipped")}  # no inputs, so no TAM data
        donors = {f: [u for u in donors[f] if u.user_id not in too_few] for f in folds}
        for f in folds:
            if not donors[f]:
                raise CopeError(f"{cfg.data}: no user of fold {other_fold(f)} has enough history for fold {f}'s "
                                "TAM; use more users or --no-tam")
        phases["tam"] = run_jobs([Job("tam", cfg, train, donors[f][0], fold=f, tam_users=[u.name for u in donors[f]])
                                  for f in folds], cfg.jobs)
    phases["users"] = run_jobs([Job("user", cfg, train, u) for u in selected], cfg.jobs)
    keys = {(k[0], k[1], k[2]): k[3] for r in phases["users"] for k in r.pop("keys")}
    skipped = {r["user_id"]: r["skipped"] for r in phases["users"] if r.get("skipped")}
    report = write_report(cfg, keys, selected, everyone, skipped=skipped)
    return {"out": str(out_dir(cfg)), "users": len(selected) - len(skipped), "skipped": skipped,
            "queries": sum(r["queries"] for r in phases["users"]),
            "generated": sum(r["generated"] for r in phases["users"]),
            "cached": sum(r["cached"] for r in phases["users"]), "seconds": round(time.monotonic() - t0, 1),
            "phases": phases, **report}


def command_line(argv) -> str:
    return "cope " + " ".join(shlex.quote(a) for a in argv)
