"""results.jsonl: one line per generation, append-only, and the cache that makes reruns free.

A row is keyed by (user, query, method, settings key); the settings key hashes everything the
output depends on (model, adapters' training keys, TAM, alpha/tau for contrastive modes, max
tokens, the prompt), so changing any of them generates again and changing nothing generates
nothing. alpha and tau are part of a row's settings only for the contrastive methods (oppu+cd,
cope): the others do not depend on them, so a sweep or a new --alpha reuses their rows. Each row is one `write()` on an O_APPEND descriptor under an flock, flushed and
fsynced: parallel workers never interleave lines, and a kill leaves at most a torn last line,
which readers skip (and the next run starts on a fresh line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

RESULTS = "results.jsonl"


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_key(row: dict) -> tuple:
    return row["user_id"], row["query_id"], row["method"], row["key"]


def read_rows(path: str | Path) -> list[dict]:
    """Every complete row; a torn or foreign line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and {"user_id", "query_id", "method", "key"} <= row.keys():
            rows.append(row)
    return rows


def repair_tail(path: str | Path) -> None:
    """End the file with a newline, so a row appended after a torn line is not glued onto it."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last != b"\n":
        with _locked(path) as fd:
            os.write(fd, b"\n")


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # Windows: O_APPEND writes of one line are still not interleaved in practice
            pass
        yield fd
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """A whole rows file at once (atomic, 0600: rows hold the user's text), e.g. a selection of rows."""
    from cope_local.paths import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_row(path: str | Path, row: dict) -> None:
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    with _locked(Path(path)) as fd:
        os.write(fd, data)


def latest(rows: list[dict], keys: dict[tuple, str] | None = None) -> list[dict]:
    """One row per (user, query, method): the one whose settings key is wanted (keys), else the last written."""
    out: dict[tuple, dict] = {}
    for r in rows:
        k = (r["user_id"], r["query_id"], r["method"])
        if keys is None or keys.get(k) == r["key"]:
            out[k] = r
    return list(out.values())
