"""The unit of a user's history, the ingest settings, and the report of what was kept.

Every reader (tables, text files, mail) yields `HistoryItem`s; `finish()` caps
their lengths and drops duplicates so all sources obey the same rules. The
report counts every item that was not kept, by reason, so `--dry-run` can say
why a 2,000-message mailbox gave 300 items.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.paths import atomic_write_text

# Skip reasons (keys of IngestReport.skipped).
NOT_FROM_ME = "not_from_me"  # mail someone else wrote (still used to find what you replied to)
DUPLICATE = "duplicate"
EMPTY = "empty_after_cleaning"  # nothing of yours left once quotes/signatures went (e.g. a bare forward)
AUTO_REPLY = "auto_reply"
BINARY = "binary_file"
UNREADABLE = "unreadable_file"
UNSUPPORTED = "unsupported_file_type"
BAD_ROW = "bad_row"  # a JSONL/CSV line that does not parse
NO_TEXT = "no_text_field"  # a row without any field we know holds text

DEFAULT_TARGET_FIELDS = ("output", "text", "reviewText", "review", "abstract", "body", "content", "tweet")
DEFAULT_INPUT_FIELDS = ("input", "query", "prompt", "title", "subject", "summary", "description")


@dataclass
class IngestConfig:
    max_output_chars: int = 4000  # longer texts are cut at a paragraph/sentence boundary (small models train on short texts)
    max_input_chars: int = 4000  # same for the replied-to text / prompt input
    max_body_chars: int = 200_000  # a mail body or file longer than this is cut before cleaning (a 10 MB message is a log, not prose)
    min_output_chars: int = 2  # "ok" is a reply; "" or "k" is not worth a training step
    reply_window_days: int = 30  # a subject match must be at most this much older than the reply
    dedupe: bool = True  # drop items whose (input, output) text repeats, ignoring case and whitespace
    # Row fields holding the text to learn (first present wins) and its prompt; tasks override these.
    target_fields: tuple[str, ...] = DEFAULT_TARGET_FIELDS
    input_fields: tuple[str, ...] = DEFAULT_INPUT_FIELDS


@dataclass
class HistoryItem:
    id: str  # stable: a hash of the normalized text
    input: str | None  # what the text answers (replied-to mail, article, prompt); None when unknown
    output: str  # what the user wrote
    source: str  # file it came from (and message/line), for humans
    meta: dict = field(default_factory=dict)  # subject, date, title, input_from, truncated, ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HistoryItem:
        return cls(id=str(data["id"]), input=data.get("input"), output=str(data["output"]),
                   source=str(data.get("source", "")), meta=dict(data.get("meta") or {}))


@dataclass
class IngestReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> up to 3 places ("file#12: subject")
    inputs: Counter = field(default_factory=Counter)  # where inputs came from: in-reply-to, subject-match, quoted, row, none
    truncated: int = 0  # items cut to max_*_chars
    notes: list = field(default_factory=list)  # one-line remarks (a truncated 10 MB message, an inferred address)
    sources: list = field(default_factory=list)  # {"path", "kind", "records"} per source read (rows, files or messages)
    kept_examples: list = field(default_factory=list)  # first 3 kept outputs, 200 chars each

    def skip(self, reason: str, where: str = "") -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if where and len(ex) < 3:
            ex.append(where)

    def note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < 50:
            self.notes.append(text)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "skipped_total": self.skipped_total,
                "examples": self.examples, "inputs": dict(self.inputs), "truncated": self.truncated,
                "notes": self.notes, "sources": self.sources, "kept_examples": self.kept_examples}

    def lines(self) -> list[str]:
        """Human summary for the CLI."""
        out = [f"kept {self.kept} items from {len(self.sources)} source(s)"]
        if self.skipped:
            parts = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.skipped.most_common())
            out.append(f"skipped {self.skipped_total}: {parts}")
            for reason, places in self.examples.items():
                if places:
                    out.append(f"  {reason.replace('_', ' ')}: e.g. {'; '.join(places)}")
        if self.inputs:
            out.append("inputs: " + ", ".join(f"{n} {k}" for k, n in self.inputs.most_common()))
        if self.truncated:
            out.append(f"truncated {self.truncated} long text(s)")
        out += [f"note: {n}" for n in self.notes]
        return out


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def text_id(output: str, input: str | None) -> str:
    key = normalize(output) + "\x00" + normalize(input or "")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def cap_text(text: str, limit: int) -> tuple[str, bool]:
    """Cut to at most `limit` chars at a paragraph, sentence or word boundary; say if cut."""
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    for sep in ("\n\n", "\n", ". ", "! ", "? ", " "):
        pos = head.rfind(sep)
        if pos >= limit // 2:
            return head[: pos + (1 if sep.strip() else 0)].rstrip(), True
    return head.rstrip(), True


def finish(items: list[HistoryItem], cfg: IngestConfig, report: IngestReport) -> list[HistoryItem]:
    """Cap lengths, drop empties and duplicates, assign ids, count inputs."""
    seen: set[str] = set()
    kept: list[HistoryItem] = []
    for item in items:
        out = item.output.strip()
        if len(out) < cfg.min_output_chars:
            report.skip(EMPTY, item.source)
            continue
        out, cut_out = cap_text(out, cfg.max_output_chars)
        inp = item.input.strip() if item.input else None
        cut_in = False
        if inp:
            inp, cut_in = cap_text(inp, cfg.max_input_chars)
        else:
            inp = None
        meta = dict(item.meta)
        if cut_out or cut_in:
            meta["truncated"] = True
            report.truncated += 1
        ident = text_id(out, inp)
        if cfg.dedupe and ident in seen:
            report.skip(DUPLICATE, item.source)
            continue
        seen.add(ident)
        meta.setdefault("input_from", "row" if inp else "none")
        report.inputs[meta["input_from"]] += 1
        kept.append(HistoryItem(id=ident, input=inp, output=out, source=item.source, meta=meta))
    report.kept = len(kept)
    report.kept_examples = [k.output[:200] for k in kept[:3]]
    return kept


def write_items(path: str | Path, items: list[HistoryItem]) -> Path:
    """items.jsonl, one item per line, written atomically and private (0600)."""
    text = "".join(json.dumps(i.to_dict(), ensure_ascii=False) + "\n" for i in items)
    return atomic_write_text(path, text, mode=0o600)


def read_items(path: str | Path) -> list[HistoryItem]:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CopeError(f"{path}: no items file; create the profile again with `cope profile create`") from None
    items = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(HistoryItem.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise CopeError(f"{path}:{n}: not a history item ({exc}); fix or remove that line") from None
    return items
