"""Read a user's writing from files, folders and mailboxes into `HistoryItem`s.

    items, report = ingest(["~/Mail/Sent", "notes/"], me=["me@example.org"])
    write_items(profile_dir / "items.jsonl", items)

Every path is classified once (mbox, Maildir, .eml, JSONL/JSON/CSV, .txt/.md,
or a folder holding any of these); unreadable, binary and unknown files are
skipped and counted in the report, never fatal. Only a missing path or an
invalid --me address raises CopeError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.ingest.items import (
    BINARY,
    UNREADABLE,
    UNSUPPORTED,
    HistoryItem,
    IngestConfig,
    IngestReport,
    finish,
    read_items,
    write_items,
)
from cope_local.ingest.mail import Mail, mail_items, read_eml, read_maildir, read_mbox
from cope_local.ingest.tables import TABLE_SUFFIXES, items_from_records, read_table
from cope_local.ingest.textfiles import TEXT_SUFFIXES, looks_binary, read_text_item

__all__ = [
    "HistoryItem",
    "IngestConfig",
    "IngestReport",
    "ingest",
    "items_from_records",
    "normalize_me",
    "read_items",
    "write_items",
]

MBOX_SUFFIXES = {".mbox", ".mbx"}
_HEADER_START = re.compile(rb"^(return-path|received|from|message-id|date|delivered-to|x-[\w-]+|mime-version|subject|to):", re.IGNORECASE)


def normalize_me(me: Iterable[str]) -> set[str]:
    out = set()
    for addr in me:
        addr = addr.strip().strip("<>").lower()
        if not re.fullmatch(r"[^@\s]+@[^@\s]+", addr):
            raise CopeError(f"--me {addr!r}: not an email address; give the address you send mail from, e.g. --me you@example.org")
        out.add(addr)
    return out


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def _classify(path: Path, explicit: bool, report: IngestReport) -> str | None:
    """'mbox' | 'eml' | 'table' | 'text' | None (skipped and counted)."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as exc:
        report.skip(UNREADABLE, f"{path.name}: {exc.strerror or exc}")
        return None
    if looks_binary(head):
        report.skip(BINARY, path.name)
        return None
    if suffix in MBOX_SUFFIXES or head.startswith(b"From "):
        return "mbox"
    if suffix == ".eml" or (not suffix and _HEADER_START.match(head) and b"\n\n" in head.replace(b"\r\n", b"\n")):
        return "eml"
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in TEXT_SUFFIXES or (explicit and not suffix):
        return "text"
    report.skip(UNSUPPORTED, path.name)
    return None


def _walk(root: Path, report: IngestReport) -> Iterable[tuple[str, Path, str]]:
    """(kind, path, label) for every readable source under a folder, in sorted order."""
    if _is_maildir(root):
        yield "maildir", root, root.name
        return
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        if here != root and _is_maildir(here):
            dirs[:] = []
            yield "maildir", here, str(here.relative_to(root.parent))
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = here / name
            kind = _classify(path, explicit=False, report=report)
            if kind:
                yield kind, path, str(path.relative_to(root.parent))


def ingest(paths: Iterable[str | os.PathLike], me: Iterable[str] = (), config: IngestConfig | None = None
           ) -> tuple[list[HistoryItem], IngestReport]:
    """All sources -> (kept items: capped, deduplicated, with ids; the report)."""
    cfg = config or IngestConfig()
    report = IngestReport()
    me_set = normalize_me(me)
    plan: list[tuple[str, Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CopeError(f"{path}: no such file or folder; check the --from path")
        if path.is_dir():
            plan.extend(_walk(path, report))
        else:
            kind = _classify(path, explicit=True, report=report)
            if kind:
                plan.append((kind, path, path.name))
    items: list[HistoryItem] = []
    mails: list[Mail] = []
    for kind, path, label in plan:
        before = len(items) + len(mails)
        if kind == "table":
            items += read_table(path, cfg, report)
        elif kind == "text":
            items += read_text_item(path, cfg, report, label)
        else:
            reader = {"mbox": read_mbox, "maildir": read_maildir, "eml": read_eml}[kind]
            try:
                mails.extend(reader(path, report))
            except (OSError, ValueError) as exc:
                report.skip(UNREADABLE, f"{label}: {exc}")
        report.sources.append({"path": str(path), "kind": kind, "records": len(items) + len(mails) - before})
    items += mail_items(mails, me_set, cfg, report)
    return finish(items, cfg, report), report
