"""Plain text / Markdown files, one item each, and the binary-file guard all readers share."""

from __future__ import annotations

import re
from pathlib import Path

from cope_local.ingest.clean import tidy
from cope_local.ingest.items import BINARY, UNREADABLE, HistoryItem, IngestConfig, IngestReport

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".rst"}


def looks_binary(head: bytes) -> bool:
    """NUL bytes or mostly control bytes in the first 8 KB (UTF-16 text has a BOM and is allowed)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    if b"\x00" in head:
        return True
    ctrl = sum(1 for b in head if b < 9 or 13 < b < 32)
    return bool(head) and ctrl / len(head) > 0.05


def read_text_file(path: Path, cfg: IngestConfig, report: IngestReport, whole: bool = False) -> tuple[str | None, bool]:
    """(decoded text or None when skipped, whether it was cut to max_body_chars; `whole` never cuts)."""
    limit = None if whole else cfg.max_body_chars
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit * 4 + 1)
    except OSError as exc:
        report.skip(UNREADABLE, f"{path.name}: {exc.strerror or exc}")
        return None, False
    if looks_binary(data[:8192]):
        report.skip(BINARY, path.name)
        return None, False
    cut = limit is not None and len(data) > limit * 4
    if cut:
        data = data[: limit * 4]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            if cut and exc.start > len(data) - 4:  # we cut inside a multi-byte character
                text = data[: exc.start].decode("utf-8-sig", errors="replace")
            else:
                text = data.decode("cp1252", errors="replace")
                report.note(f"{path.name}: not UTF-8, read as Windows-1252")
    if limit is not None and len(text) > limit:
        text, cut = text[:limit], True
    if cut:
        report.note(f"{path.name}: file cut to its first {cfg.max_body_chars:,} characters")
    return text.replace("\r\n", "\n").replace("\r", "\n"), cut


def read_text_item(path: Path, cfg: IngestConfig, report: IngestReport, label: str) -> list[HistoryItem]:
    """One file -> one item; a Markdown `# Heading` or front-matter title becomes meta['title']."""
    text, cut = read_text_file(path, cfg, report)
    if text is None:
        return []
    meta: dict = {"kind": "text", "file": label}
    front = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    if front:
        title = re.search(r"^title:\s*(.+)$", front.group(1), re.MULTILINE)
        if title:
            meta["title"] = title.group(1).strip().strip("\"'")
        text = text[front.end():]
    heading = re.match(r"^\s*#{1,3}\s+(.+)\n", text)
    if heading and "title" not in meta and text[heading.end():].strip():
        meta["title"] = heading.group(1).strip()
        text = text[heading.end():]
    if cut:
        meta["truncated"] = True
    return [HistoryItem(id="", input=None, output=tidy(text), source=label, meta=meta)]
