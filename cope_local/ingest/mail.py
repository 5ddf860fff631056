"""Mail (mbox, Maildir, .eml) -> the user's own messages, each paired with what it replied to.

Which mail is the user's: From is one of the `me` addresses, or, when none are
given, the message sits in a folder named like Sent. The replied-to message,
in order of trust: In-Reply-To/References pointing into the given archives;
else the quoted original under the reply (Outlook's `-----Original Message-----`
block, `>` lines); else the latest message with the same subject (Re:/Fw:
stripped) from one of the reply's recipients, at most `reply_window_days` older
(the Enron corpus and many exports carry no threading headers). Other people's mail is read only for headers unless it is a parent.
The quoted original ranks above the subject match: it is the very text the
user saw, while a subject match can pick another message of a long thread
(on Enron users, 10-27 % of subject matches disagreed with the quoted block,
and the quoted block was the right one in the cases we read).
"""

from __future__ import annotations

import codecs
import email.policy
import mailbox
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.header import decode_header
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
from pathlib import Path

from cope_local.ingest.clean import html_to_text, split_reply
from cope_local.ingest.items import AUTO_REPLY, EMPTY, NOT_FROM_ME, HistoryItem, IngestConfig, IngestReport

BAD_MESSAGE = "unparsable_message"
_SENT_WORDS = r"(sent|outbox|gesendet|envoy[ée]s?|enviados?|inviata|verzonden|skickat)"
_SENT_RE = re.compile(rf"(?<![a-z]){_SENT_WORDS}(?![a-z])", re.IGNORECASE)  # inside a file name: enron.x.sent_items.mbox
_SENT_DIR_RE = re.compile(rf"[._\[\]\s]*{_SENT_WORDS}([ _-]?(items|mail|messages))?", re.IGNORECASE)  # a whole folder name
_PREFIX_RE = re.compile(r"^\s*((re|fw|fwd|aw|wg|sv|vs|tr|rif|antw)(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_REPLY_PREFIX_RE = re.compile(r"^\s*(re|aw|sv|vs|antw|rif)(\[\d+\])?\s*:", re.IGNORECASE)
_AUTO_SUBJECT_RE = re.compile(r"^\s*(out of (the )?office|automatic reply|auto(matic)?[- ]?(reply|response)|abwesenheit)", re.IGNORECASE)


def is_sent_folder(name: str) -> bool:
    """A folder named 'Sent', 'Sent Items', '.Sent', 'INBOX.Sent', '_sent_mail', 'Gesendet' ..."""
    return bool(_SENT_DIR_RE.fullmatch(re.split(r"[./]", name.strip("./"))[-1] if name.strip("./") else ""))


def is_sent_file(name: str) -> bool:
    """An mbox file named like a Sent folder: 'Sent', 'sent.mbox', 'enron.x.sent_items.mbox' (not 'sentences')."""
    return bool(_SENT_RE.search(Path(name).stem if Path(name).suffix.lower() in (".mbox", ".mbx") else name))


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode by the declared charset, replacing what cannot be decoded.

    Undeclared or us-ascii text that is really 8-bit is tried as UTF-8, then
    Windows-1252; ISO-8859-1 is read as Windows-1252 (its superset, as browsers do).
    """
    cs = (charset or "").strip().strip('"').lower()
    if cs in ("", "us-ascii", "ascii", "unknown-8bit", "x-unknown", "default", "none"):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("cp1252", errors="replace")
    if cs in ("iso-8859-1", "iso8859-1", "latin-1", "latin1", "l1"):
        cs = "cp1252"
    try:
        codecs.lookup(cs)
    except LookupError:
        cs = "utf-8"
    return data.decode(cs, errors="replace")


def header_text(value) -> str:
    """A header as one line of text, RFC 2047 words decoded (bad charsets replaced, never raised)."""
    if value is None:
        return ""
    raw = str(value)
    try:
        parts = decode_header(raw)
        text = "".join(decode_bytes(t, c) if isinstance(t, bytes) else t for t, c in parts)
    except Exception:  # malformed encoded words: keep the raw header
        text = raw
    return re.sub(r"\s+", " ", text).strip()


def _unmunge_from(text: str) -> str:
    """Undo mbox "From " escaping (">From " at line start) outside real `>` quotes."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(">From ") or line.startswith(">>From "):
            prev = lines[i - 1] if i else ""
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not prev.startswith(">") and not nxt.startswith(">"):
                lines[i] = line[1:]
    return "\n".join(lines)


def _text_part(msg: Message) -> Message | None:
    """The part holding the body text: text/plain preferred, else text/html; attachments skipped."""
    ctype = msg.get_content_type()
    if msg.is_multipart():
        if ctype == "multipart/alternative":
            parts = [p for p in msg.get_payload() if isinstance(p, Message)]
            for want in ("text/plain", "text/html"):
                for p in parts:
                    if p.get_content_type() == want:
                        return p
            for p in parts:
                found = _text_part(p)
                if found is not None:
                    return found
            return None
        for p in msg.get_payload():
            if not isinstance(p, Message) or p.get_content_type() == "message/rfc822":
                continue  # a forwarded message is not the author's text
            if (p.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
                continue
            found = _text_part(p)
            if found is not None:
                return found
        return None
    if ctype in ("text/plain", "text/html") or msg.get_content_maintype() == "text" and ctype != "text/calendar":
        return msg
    return None


def body_text(msg: Message, limit: int) -> tuple[str, bool]:
    """(plain text of the body, whether it was cut to `limit` characters)."""
    part = _text_part(msg)
    if part is None:
        return "", False
    try:
        data = part.get_payload(decode=True)
    except Exception:  # broken base64/quoted-printable: fall back to the raw payload
        data = None
    if data is None:
        payload = part.get_payload()
        data = payload.encode("utf-8", "replace") if isinstance(payload, str) else b""
    cut = False
    if len(data) > limit * 4:  # bound decoding work; chars <= bytes for every charset we meet
        data, cut = data[: limit * 4], True
    text = decode_bytes(data, part.get_content_charset())
    if part.get_content_type() == "text/html":
        text = html_to_text(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(text) > limit:
        text, cut = text[:limit], True
    return text, cut


@dataclass
class Mail:
    where: str  # "file#3" or "Maildir/.Sent/key", for reports
    sent_folder: bool
    mbox: bool  # came from an mbox (so ">From " escaping may need undoing)
    load: Callable[[], Message]  # full parse, on demand
    size: int
    from_addr: str = ""
    recipients: set = field(default_factory=set)
    date: datetime | None = None
    subject: str = ""
    message_id: str = ""
    parents: list = field(default_factory=list)  # In-Reply-To then References, nearest first
    auto: bool = False

    @property
    def norm_subject(self) -> str:
        return re.sub(r"\s+", " ", _PREFIX_RE.sub("", self.subject)).strip().casefold()

    @property
    def is_reply(self) -> bool:
        return bool(_REPLY_PREFIX_RE.match(self.subject))


def _ids(value: str) -> list[str]:
    return re.findall(r"<([^<>\s]+)>", value or "")


def _fill_headers(mail: Mail, head: Message) -> None:
    mail.from_addr = parseaddr(header_text(head.get("From")))[1].lower()
    tos = [header_text(v) for k in ("To", "Cc") for v in (head.get_all(k) or [])]
    mail.recipients = {a.lower() for _, a in getaddresses(tos) if a}
    mail.subject = header_text(head.get("Subject"))
    ids = _ids(header_text(head.get("Message-ID")))
    mail.message_id = ids[0] if ids else ""
    mail.parents = _ids(header_text(head.get("In-Reply-To"))) + list(reversed(_ids(header_text(head.get("References")))))
    try:
        date = parsedate_to_datetime(header_text(head.get("Date")))
        mail.date = date if date.tzinfo else date.replace(tzinfo=timezone.utc)
    except (TypeError, ValueError, IndexError, OverflowError):
        mail.date = None
    auto = header_text(head.get("Auto-Submitted")).lower()
    mail.auto = bool(auto and auto != "no") or bool(head.get("X-Autoreply")) or bool(_AUTO_SUBJECT_RE.match(mail.subject))


def _parse(data: bytes) -> Message:
    return BytesParser(policy=email.policy.compat32).parsebytes(data)


def _from_box(box: mailbox.Mailbox, label: str, sent: bool, is_mbox: bool, report: IngestReport) -> Iterator[Mail]:
    try:
        keys = list(box.keys())
    except Exception as exc:  # noqa: BLE001 - any reader failure is a skipped source, not a crash
        report.skip(BAD_MESSAGE, f"{label}: {exc}")
        return
    if not is_mbox:
        keys.sort(key=str)  # Maildir names start with the delivery time: sorted ~ chronological, and stable
    for n, key in enumerate(keys, 1):
        where = f"{label}#{n}" if is_mbox else f"{label}/{key}"
        try:
            data = box.get_bytes(key)
            head = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        except Exception:  # noqa: BLE001
            report.skip(BAD_MESSAGE, where)
            continue
        mail = Mail(where=where, sent_folder=sent, mbox=is_mbox, size=len(data),
                    load=(lambda b=box, k=key: _parse(b.get_bytes(k))))
        _fill_headers(mail, head)
        yield mail


def read_mbox(path: Path, report: IngestReport) -> Iterator[Mail]:
    sent = is_sent_file(path.name) or is_sent_folder(path.parent.name)
    yield from _from_box(mailbox.mbox(str(path), create=False), path.name, sent, True, report)


def read_maildir(path: Path, report: IngestReport) -> Iterator[Mail]:
    """A Maildir and its Maildir++ subfolders (.Sent, .Archive, ...)."""
    box = mailbox.Maildir(str(path), factory=None, create=False)
    yield from _from_box(box, path.name, is_sent_folder(path.name), False, report)
    try:
        folders = sorted(box.list_folders())
    except OSError:
        folders = []
    for name in folders:
        yield from _from_box(box.get_folder(name), f"{path.name}/.{name}", is_sent_folder(name), False, report)


def read_eml(path: Path, report: IngestReport) -> Iterator[Mail]:
    data = path.read_bytes()
    try:
        head = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    except Exception:  # noqa: BLE001
        report.skip(BAD_MESSAGE, path.name)
        return
    sent = is_sent_folder(path.parent.name)
    mail = Mail(where=path.name, sent_folder=sent, mbox=False, size=len(data), load=lambda: _parse(data))
    _fill_headers(mail, head)
    yield mail


def _clean_body(mail: Mail, cfg: IngestConfig, report: IngestReport) -> tuple[str, bool] | None:
    try:
        msg = mail.load()
    except Exception:  # noqa: BLE001
        report.skip(BAD_MESSAGE, mail.where)
        return None
    text, cut = body_text(msg, cfg.max_body_chars)
    if cut:
        report.note(f"{mail.where}: {mail.size / 1e6:.1f} MB message cut to its first {cfg.max_body_chars:,} characters")
    if mail.mbox:
        text = _unmunge_from(text)
    return text, cut


def mail_items(mails: list[Mail], me: set[str], cfg: IngestConfig, report: IngestReport) -> list[HistoryItem]:
    """The user's messages as HistoryItems (input = the replied-to text when found)."""

    def mine(m: Mail) -> bool:
        return m.from_addr in me if me else m.sent_folder

    if mails and not me and not any(m.sent_folder for m in mails):
        report.note("no --me address and no folder named like Sent: cannot tell which mail is yours; pass --me you@example.org")
    by_id = {m.message_id: m for m in mails if m.message_id}
    by_subject: dict[str, list[Mail]] = defaultdict(list)
    for m in mails:
        if not mine(m) and m.norm_subject and m.date:
            by_subject[m.norm_subject].append(m)
    parent_cache: dict[int, str | None] = {}

    def parent_text(p: Mail) -> str | None:
        if id(p) not in parent_cache:
            got = _clean_body(p, cfg, report)
            parent_cache[id(p)] = (split_reply(got[0]).own or None) if got else None
        return parent_cache[id(p)]

    window = timedelta(days=cfg.reply_window_days)
    items: list[HistoryItem] = []
    for m in mails:
        if not mine(m):
            report.skip(NOT_FROM_ME, f"{m.where} from {m.from_addr or '?'}")
            continue
        if m.auto:
            report.skip(AUTO_REPLY, m.where)
            continue
        got = _clean_body(m, cfg, report)
        if got is None:
            continue
        body, cut = got
        split = split_reply(body)
        if not split.own:
            report.skip(EMPTY, f"{m.where}: {m.subject[:60]}")
            continue
        source, text = "none", None
        for pid in m.parents:
            p = by_id.get(pid)
            if p is not None and p is not m and (text := parent_text(p)):
                source = "in-reply-to"
                break
        if text is None and split.quoted:
            source, text = "quoted", split.quoted
        if text is None and m.is_reply and m.norm_subject and m.date:
            cands = [c for c in by_subject.get(m.norm_subject, ())
                     if c is not m and c.date <= m.date and m.date - c.date <= window
                     and (not m.recipients or c.from_addr in m.recipients)]
            for c in sorted(cands, key=lambda c: c.date, reverse=True):
                if text := parent_text(c):
                    source = "subject-match"
                    break
        meta = {"kind": "mail", "subject": m.subject, "from": m.from_addr, "to": sorted(m.recipients),
                "date": m.date.isoformat() if m.date else None, "message_id": m.message_id, "input_from": source}
        if cut:
            meta["truncated"] = True
        items.append(HistoryItem(id="", input=text, output=split.own, source=m.where, meta=meta))
    return items
