"""Benchmark users for `cope eval`: loading, the held-out slice of each history, and the 2-fold TAM split.

Two input layouts are read:

* one user per line `{user_id, task, profile: [...], queries: [{id, input, output}]}` (shared/data/*.jsonl);
* LaMP's original pair: questions (JSON list of `{id, input, profile}`, one question per user in the
  user-based split) and outputs (`{task, golds: [{id, output}]}`).

Profile rows become `HistoryItem`s through the same ingest code a profile uses (task-specific
fields, caps, de-duplication, ids), so a user's training history is what `cope profile create`
would have kept. A query's `input` is already the benchmark prompt and is used verbatim.

The TAM split is fixed by a hash of the user id, not by file order: fold A users get a TAM trained
on fold B users' histories and vice versa, so no user's TAM ever saw that user's text, and the same
user lands in the same fold whatever --users selects.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.ingest.items import HistoryItem, IngestConfig, IngestReport, finish
from cope_local.tasks import Task, get_task

# The benchmark's task name (the file's "task") -> our registry task.
BENCHMARK_TASK = {"lamp-7": "lamp7", "lamp-4": "headline", "lamp-5": "title", "longlamp-2": "abstract-generation",
                  "longlamp-3": "review-writing", "longlamp-4": "topic-writing"}
FOLDS = ("A", "B")


@dataclass
class Query:
    id: str
    prompt: str  # the user message given to the decoder, verbatim
    reference: str  # the user's real text
    kind: str = "query"  # "query" (the benchmark's) | "holdout" (a profile item held out, see EvalUser.holdout)


@dataclass
class EvalUser:
    user_id: str
    task: str  # registry task name
    history: list[HistoryItem]  # training history (held-out items removed)
    queries: list[Query]  # the benchmark's queries
    holdout: list[HistoryItem] = field(default_factory=list)  # last N profile items: queries once they have an input

    @property
    def name(self) -> str:
        """A folder/adapter-safe name; a hash suffix keeps two ids that clean to the same name apart."""
        clean = re.sub(r"[^A-Za-z0-9._-]", "_", self.user_id).strip("._-")[:48] or "user"
        if clean != self.user_id:
            clean += "-" + hashlib.sha256(self.user_id.encode()).hexdigest()[:6]
        return clean

    @property
    def fold(self) -> str:
        return fold_of(self.user_id)


def fold_of(user_id: str) -> str:
    """'A' or 'B' from a stable hash of the id (not Python's hash(): that one is salted per process)."""
    return FOLDS[int(hashlib.sha256(str(user_id).encode("utf-8")).hexdigest(), 16) % 2]


def other_fold(fold: str) -> str:
    return FOLDS[1 - FOLDS.index(fold)]


def tam_history(users: list[EvalUser], fold: str) -> list[HistoryItem]:
    """Training items for the TAM that users of `fold` use: the histories of the *other* fold's users."""
    return [item for u in users if u.fold == other_fold(fold) for item in u.history]


def task_for(name: str, where: str) -> Task:
    key = str(name or "").strip().lower().replace("_", "-")  # LaMP's own files say LaMP_4
    try:
        return get_task(BENCHMARK_TASK.get(key, key))
    except CopeError:
        raise CopeError(f"{where}: task {name!r} is not one cope eval knows; use one of "
                        "LaMP-7, LaMP-4, LaMP-5, LongLaMP-2, LongLaMP-3, LongLaMP-4") from None


def profile_items(rows: list, task: Task, source: str) -> list[HistoryItem]:
    """A user's profile rows -> kept history items, exactly as ingest keeps a profile's (fields, caps, ids)."""
    from dataclasses import replace

    from cope_local.ingest import items_from_records

    cfg = replace(IngestConfig(), target_fields=task.target_fields, input_fields=task.input_fields)
    if task.input_format:  # several fields make the input ("input" is the first input field, so it wins)
        rows = [{**r, "input": task.row_input(r)} if isinstance(r, dict) and task.row_input(r) else r for r in rows]
    return finish(items_from_records(rows, source, cfg, IngestReport()), cfg, IngestReport())


def _user(row: dict, task: Task, where: str, holdout: int) -> EvalUser:
    uid = str(row.get("user_id") or row.get("id") or "")
    profile = row.get("profile")
    if not uid or not isinstance(profile, list):
        raise CopeError(f"{where}: a user needs user_id and a profile list; is this a cope eval data file?")
    queries = []
    for q in row.get("queries") or []:
        if not isinstance(q, dict) or "input" not in q or "output" not in q:
            raise CopeError(f"{where}: every query needs id, input and output")
        queries.append(Query(str(q.get("id", len(queries))), str(q["input"]), str(q["output"])))
    items = profile_items(profile, task, where)
    cut = min(max(0, holdout), max(0, len(items) - 1))
    history, held = (items[:-cut], items[-cut:]) if cut else (items, [])
    return EvalUser(uid, task.name, history, queries, held)


def load_users(data: str | Path, outputs: str | Path | None = None, *, holdout: int = 0) -> list[EvalUser]:
    """Every user of the file(s), in file order (the caller picks --users N of them)."""
    path = Path(data).expanduser()
    if not path.is_file():
        raise CopeError(f"{path}: no such file; give --data a JSONL of users or LaMP's questions JSON")
    if outputs is not None:
        return _load_lamp_pair(path, Path(outputs).expanduser(), holdout)
    users: list[EvalUser] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise CopeError(f"{path}:{n}: not JSON; give one user object per line "
                                "(or LaMP's questions JSON with --outputs)") from None
            if not isinstance(row, dict):
                raise CopeError(f"{path}:{n}: not a user object")
            users.append(_user(row, task_for(row.get("task"), f"{path}:{n}"), f"{path}:{n}", holdout))
    if not users:
        raise CopeError(f"{path}: no users; give a file with one user per line")
    ids = [u.user_id for u in users]
    if len(set(ids)) != len(ids):
        raise CopeError(f"{path}: user ids repeat; each line must be one distinct user")
    return users


def _load_lamp_pair(questions: Path, outputs: Path, holdout: int) -> list[EvalUser]:
    try:
        qs = json.loads(questions.read_text(encoding="utf-8"))
    except ValueError:
        raise CopeError(f"{questions}: not JSON; LaMP's questions file is one JSON list") from None
    if not outputs.is_file():
        raise CopeError(f"{outputs}: no such file; give --outputs LaMP's outputs JSON ({{task, golds}})")
    try:
        out = json.loads(outputs.read_text(encoding="utf-8"))
        golds = {str(g["id"]): str(g["output"]) for g in out["golds"]}
    except (ValueError, KeyError, TypeError):
        raise CopeError(f"{outputs}: not LaMP's outputs JSON ({{\"task\": ..., \"golds\": [{{id, output}}]}})") from None
    if not isinstance(qs, list):
        raise CopeError(f"{questions}: expected a JSON list of {{id, input, profile}}")
    task = task_for(out.get("task"), str(outputs))
    users = []
    for n, q in enumerate(qs, 1):
        qid = str(q.get("id")) if isinstance(q, dict) else ""
        if qid not in golds:
            raise CopeError(f"{questions}: question {qid or n} has no gold output in {outputs}; give the matching pair")
        row = {"user_id": qid, "profile": q.get("profile"),
               "queries": [{"id": qid, "input": q.get("input", ""), "output": golds[qid]}]}
        users.append(_user(row, task, f"{questions}#{n}", holdout))
    return users
