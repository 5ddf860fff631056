"""JSONL / JSON / CSV history: plain `{input?, output}` rows and LaMP-style profile items.

LaMP profiles hold items such as `{text}` (tweets), `{title, text}` (news),
`{title, abstract}` (papers); which field is the user's text depends on the
task (a headline task learns `title`), so the field lists come from the
config, which the task fills. A whole LaMP user row `{user_id, profile:[...],
queries:[...]}` is expanded to its profile; queries are test data and are
never ingested.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.ingest.items import BAD_ROW, NO_TEXT, HistoryItem, IngestConfig, IngestReport
from cope_local.ingest.textfiles import read_text_file

TABLE_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv"}


def _scalar_meta(row: dict, used: set[str]) -> dict:
    meta = {}
    for key, value in row.items():
        if key in used or not isinstance(key, str):
            continue
        if isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 300):
            meta[key] = value
    return meta


def _first(row: dict, fields: Iterable[str], exclude: str | None = None) -> tuple[str | None, str | None]:
    for name in fields:
        if name == exclude:
            continue
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return name, value
    return None, None


def items_from_records(rows: Iterable, source: str, cfg: IngestConfig | None = None,
                       report: IngestReport | None = None) -> list[HistoryItem]:
    """Rows (dicts or strings) -> HistoryItems; public so callers can feed LaMP users directly."""
    cfg = cfg or IngestConfig()
    report = report if report is not None else IngestReport()
    items = []
    for n, row in enumerate(rows, 1):
        where = f"{source}:{n}"
        if isinstance(row, str):
            row = {"output": row}
        if not isinstance(row, dict):
            report.skip(BAD_ROW, where)
            continue
        out_key, output = _first(row, cfg.target_fields)
        if output is None:
            report.skip(NO_TEXT, f"{where} (fields: {', '.join(map(str, row))[:80]})")
            continue
        in_key, inp = _first(row, cfg.input_fields, exclude=out_key)
        meta = {"kind": "row", **_scalar_meta(row, {out_key, in_key})}
        if in_key:
            meta["input_field"] = in_key
            if in_key in ("title", "subject"):
                meta.setdefault(in_key, inp)
        meta["input_from"] = "row" if inp else "none"
        items.append(HistoryItem(id="", input=inp, output=output.replace("\r\n", "\n"), source=where, meta=meta))
    return items


def _expand_users(rows: list, path: Path) -> list:
    """If rows are LaMP user rows (with a `profile` list), return the one user's profile items."""
    users = [r for r in rows if isinstance(r, dict) and isinstance(r.get("profile"), list)]
    if not users:
        return rows
    if len(users) > 1:
        raise CopeError(f"{path}: holds {len(users)} users' LaMP profiles; give one user's line "
                        f"(e.g. `sed -n 1p {path.name} > me.jsonl`) or plain {{input, output}} rows")
    return users[0]["profile"]


def read_table(path: Path, cfg: IngestConfig, report: IngestReport) -> list[HistoryItem]:
    suffix = path.suffix.lower()
    text, _ = read_text_file(path, cfg, report, whole=True)
    if text is None:
        return []
    if suffix in (".jsonl", ".ndjson"):
        rows: list = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                report.skip(BAD_ROW, f"{path.name}:{n}")
        rows = _expand_users(rows, path)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CopeError(f"{path}: not valid JSON ({exc}); fix it or export one JSON object per line (.jsonl)") from None
        rows = data if isinstance(data, list) else [data]
        rows = _expand_users(rows, path)
    else:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        try:
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as exc:
            raise CopeError(f"{path}: not a readable CSV ({exc}); save it as UTF-8 CSV with a header row") from None
        if rows and not any(f in rows[0] for f in (*cfg.target_fields, *cfg.input_fields)):
            report.note(f"{path.name}: no column named {', '.join(cfg.target_fields[:3])}...; "
                        f"found {', '.join(map(str, rows[0]))[:80]}")
    return items_from_records(rows, path.name, cfg, report)
