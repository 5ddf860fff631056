"""Turn one mail body into what its author wrote, plus the text they replied to.

Mail clients bury the author's words under quoted replies, attributions,
signatures and disclaimers; training on those would teach the model to write
like Outlook. Everything here is conservative: a line is removed only when it
matches a known shape (an Outlook `-----Original Message-----` header, `>`
quoting, an "On ... wrote:" line, a `-- ` signature delimiter, a contact block
with a phone number, a legal disclaimer). Sign-offs such as "Thanks, Kay" are
the author's voice and stay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

# A line from which everything below is someone else's message (Outlook, Lotus Notes, webmail).
_MARKER = (r"-{2,}\s*(original message|original appointment|forwarded message|message d'origine"
           r"|urspr.ngliche nachricht|mensaje original|messaggio originale|reply message)\s*-{2,}")
_MARKER_RE = re.compile(_MARKER, re.IGNORECASE)
_CUT_RES = [
    re.compile(r"^\s*" + _MARKER, re.IGNORECASE),
    re.compile(r"^\s*-{3,}\s*forwarded by\b", re.IGNORECASE),
    re.compile(r"^\s*-{3,}\s*inline attachment follows\s*-{2,}", re.IGNORECASE),
    re.compile(r"^\s*begin forwarded message:\s*$", re.IGNORECASE),
]
_HEADER_RE = re.compile(r"^\s*>?\s*(from|sent|date|to|cc|bcc|subject|importance|attachments|reply-to)\s*:", re.IGNORECASE)
_FROM_RE = re.compile(r"^\s*(from|von|de)\s*:\s*\S", re.IGNORECASE)
_RULE_RE = re.compile(r"^\s*(_{8,}|-{8,}|\*{8,}|={8,})\s*$")
# "On Tue, 3 May 2001, Kay Mann <kay@x.com> wrote:" (sometimes wrapped over two lines).
_ON_WROTE_RE = re.compile(r"^\s*(on|am|le|el)\s.{4,300}(wrote|schrieb|a écrit|escribió)\s*:\s*$", re.IGNORECASE | re.DOTALL)
_WROTE_RE = re.compile(r"^\s*\S.{0,120}\s(wrote|writes|schrieb)\s*:\s*$", re.IGNORECASE)
# Lotus Notes: "Dave Fuller@ECT" / "04/10/2001 03:09 PM" / "To: ...".
_NOTES_DATE_RE = re.compile(r"^\s*(\S.{0,80}\s+on\s+)?\d{1,2}/\d{1,2}/\d{2,4}\s+\d{1,2}:\d{2}(:\d{2})?\s*(AM|PM)?\s*$", re.IGNORECASE)
_QUOTE_RE = re.compile(r"^\s*>")
_STUB_RE = re.compile(r"^\s*(<<[^<>]{1,200}>>|<Embedded [^<>]{1,80}>|\[cid:[^\]]{1,200}\])\s*$")
_MOBILE_RE = re.compile(
    r"^\s*(sent (from|via|using|with) (my |the )?.{0,40}(iphone|ipad|blackberry|android|mobile|phone|handheld|galaxy|outlook|mail)"
    r".{0,60}|get outlook for \w+.{0,20})\s*$", re.IGNORECASE)
_PHONE_RE = re.compile(r"(\+?\(?\d{1,4}\)?[\s.-]?)?\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b|\b(tel|phone|fax|mobile|cell|direct|office|ph|mob)\b\.?\s*[:#]", re.IGNORECASE)
_CONTACT_RE = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+|https?://\S+|www\.\S+", re.IGNORECASE)
_SIGNOFF_RE = re.compile(r"^\s*(thanks|thank you|many thanks|regards|best|cheers|sincerely|cordially|respectfully|"
                         r"take care|(warm|kind|best|warmest)\s+regards|all the best|yours|love|fair winds)\b[\w ,.!-]{0,20}$", re.IGNORECASE)
_DISCLAIMER_WORDS = ("confidential", "intended recipient", "privileged", "property of", "disclaimer",
                     "prohibited", "notify the sender", "legally")


@dataclass
class Split:
    own: str  # what the author wrote, cleaned
    quoted: str | None  # the first message they quoted (the replied-to text), cleaned; None if none


def _norm(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    return text


def tidy(text: str) -> str:
    """Right-strip lines, drop attachment stubs, squeeze blank runs to one empty line, strip ends."""
    out: list[str] = []
    for line in _norm(text).split("\n"):
        line = line.rstrip()
        if _STUB_RE.match(line):
            continue
        if not line.strip() and out and not out[-1].strip():
            continue
        out.append(line)
    return "\n".join(out).strip("\n").strip()


def _is_cut(lines: list[str], i: int) -> bool:
    line = lines[i]
    if any(r.match(line) for r in _CUT_RES):
        return True
    nxt = [x for x in lines[i + 1 : i + 7]]
    if _FROM_RE.match(line):
        # An Outlook/webmail header block: From: followed closely by Sent:/Date: and To:/Subject:.
        heads = [_HEADER_RE.match(x).group(1).lower() for x in nxt if _HEADER_RE.match(x)]
        return any(h in ("sent", "date") for h in heads) and any(h in ("to", "subject") for h in heads)
    if _NOTES_DATE_RE.match(line):
        return any(re.match(r"^\s*to\s*:", x, re.IGNORECASE) for x in nxt[:4])
    return False


def _attribution_at(lines: list[str], i: int) -> int:
    """Number of lines (1 or 2) of an "On ... wrote:" attribution starting at i, else 0."""
    line = lines[i].strip()
    if not line or _QUOTE_RE.match(line):
        return 0
    if _ON_WROTE_RE.match(line) or (_WROTE_RE.match(line) and len(line) < 160):
        return 1
    if i + 1 < len(lines) and re.match(r"^\s*(on|am|le|el)\s", line, re.IGNORECASE):
        joined = line + " " + lines[i + 1].strip()
        if _ON_WROTE_RE.match(joined):
            return 2
    return 0


def _skip_headers(lines: list[str]) -> list[str]:
    """Drop a quoted message's header block (From:/Sent:/To:/Subject: ...) and the marker above it."""
    i = 0
    while i < len(lines) and (not lines[i].strip() or any(r.match(lines[i]) for r in _CUT_RES) or _RULE_RE.match(lines[i])):
        i += 1
    j = i
    saw_header = False
    while j < len(lines):
        line = lines[j]
        if _HEADER_RE.match(line) or _NOTES_DATE_RE.match(line):
            saw_header = True
        elif saw_header and line.strip() and line[:1] in (" ", "\t") and not line.strip().endswith("."):
            pass  # continuation of a folded header (long To: lists)
        elif saw_header and line.strip() and j + 1 < len(lines) and _HEADER_RE.match(lines[j + 1]):
            pass  # a header wrapped onto its own line ("From: x@y.com" / "[mailto:x@y.com]" / "Sent: ...")
        elif not saw_header and j == i and line.strip() and j + 1 < len(lines) and _NOTES_DATE_RE.match(lines[j + 1]):
            pass  # Lotus Notes sender name line above the date line
        elif not line.strip() and saw_header and j + 1 < len(lines) and _HEADER_RE.match(lines[j + 1]):
            pass  # Notes puts a blank line between cc: and Subject:
        else:
            break
        j += 1
    return lines[j:] if saw_header else lines[i:]


def _unquote(lines: list[str]) -> list[str]:
    return [re.sub(r"^\s*> ?", "", x) for x in lines]


def _is_contact_line(line: str) -> bool:
    """A signature line that is mostly a phone number, address or URL ("Tel: 713 853 3488")."""
    if not (_PHONE_RE.search(line) or _CONTACT_RE.search(line)):
        return False
    rest = _CONTACT_RE.sub(" ", _PHONE_RE.sub(" ", line))
    return len(re.findall(r"[A-Za-z]{2,}", rest)) <= 3


def strip_signature(text: str) -> str:
    """Remove `-- ` signatures, mobile footers, disclaimers and trailing contact blocks."""
    lines = tidy(text).split("\n")
    for i, line in enumerate(lines):
        if line.rstrip() == "--":  # RFC 3676 delimiter ("-- "), rstripped by tidy
            lines = lines[:i]
            break
    # Disclaimer: a rule line followed by legal words, or a trailing paragraph full of them.
    for i, line in enumerate(lines):
        if _RULE_RE.match(line):
            after = " ".join(lines[i + 1 : i + 8]).lower()
            if sum(w in after for w in _DISCLAIMER_WORDS) >= 2:
                lines = lines[:i]
                break
    # A rule line near the end followed only by a few short lines with a phone/address: a signature.
    for i in range(max(0, len(lines) - 6), len(lines)):
        tail = [x for x in lines[i + 1 :] if x.strip()]
        if not (_RULE_RE.match(lines[i]) or re.match(r"^\s*-{8,}\s*$", lines[i])) or not 0 < len(tail) <= 5:
            continue
        contact = all(len(x.strip()) <= 60 for x in tail) and any(_is_contact_line(x) for x in tail)
        advert = len(tail) <= 3 and re.search(r"https?://|www\.", " ".join(tail), re.IGNORECASE)  # webmail's "Get your FREE ..."
        if contact or advert:
            lines = lines[:i]
            break
    changed = True
    while changed and lines:
        changed = False
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            break
        if re.fullmatch(r"\s*[-_*=]{2,}\s*", lines[-1]) and lines[-1].strip() != "--":
            lines.pop()  # a rule line left dangling at the end
            changed = True
            continue
        if _MOBILE_RE.match(lines[-1]):
            lines.pop()
            while lines and (not lines[-1].strip() or re.match(r"^\s*-{2,}\s*$", lines[-1])):
                lines.pop()
            changed = True
            continue
        start = len(lines)
        while start > 0 and lines[start - 1].strip():
            start -= 1
        para = lines[start:]
        if start == 0:
            break  # never remove the only paragraph
        low = " ".join(para).lower()
        if sum(w in low for w in _DISCLAIMER_WORDS) >= 2 and len(low) > 80:
            del lines[start:]
            changed = True
            continue
        short = all(len(x.strip()) <= 60 for x in para) and 2 <= len(para) <= 10
        if short and any(_is_contact_line(x) for x in para) and not any(x.rstrip().endswith(("?", "!")) for x in para):
            signoff = next((k for k, x in enumerate(para) if _SIGNOFF_RE.match(x)), None)
            if signoff is not None and signoff + 2 < len(para):  # keep "Thanks,\nJason", drop title and phone
                del lines[start + signoff + 2 :]
                break
            if signoff is None:
                del lines[start:]
                changed = True
    return tidy("\n".join(lines))


def _split_markers(lines: list[str]) -> list[str]:
    """Put a mid-line "-----Original Message-----" on its own line ("asap-----Original Message-----")."""
    out = []
    for line in lines:
        m = _MARKER_RE.search(line)
        if m and line[: m.start()].strip() and not _QUOTE_RE.match(line):
            head = line[: m.start()].rstrip()
            if not re.fullmatch(r"\s*(\[[^\]]{1,60}\]|[-_*=\s]+)\s*", head):  # Outlook's "[Name]" label, stray dashes
                out.append(head)
            out.append(line[m.start():])
        else:
            out.append(line)
    return out


def split_reply(body: str, _depth: int = 0) -> Split:
    """Split a mail body into the author's own text and the first quoted message."""
    lines = _split_markers(tidy(body).split("\n"))
    cut = len(lines)
    for i in range(len(lines)):
        if _is_cut(lines, i):
            cut = i
            if i > 0 and _RULE_RE.match(lines[i - 1]) and re.match(r"^\s*_{8,}", lines[i - 1]):
                cut = i - 1  # Outlook's "____" line above the From: block
            break
    top, below = lines[:cut], lines[cut:]
    own: list[str] = []
    quoted: list[str] = []
    i = 0
    while i < len(top):
        n = _attribution_at(top, i)
        if n:
            rest = [x for x in top[i + n :] if x.strip()]
            if not rest or _QUOTE_RE.match(rest[0]):  # an attribution only when a quote (or the cut) follows
                i += n
                continue
        if _QUOTE_RE.match(top[i]):
            quoted.append(top[i])
        else:
            own.append(top[i])
        i += 1
    quoted_text: str | None = None
    inner = _skip_headers(_unquote(quoted)) if quoted else _skip_headers(below) if below else []
    if inner and _depth < 3:  # the nearest message (or what a bare forward forwarded); deeper ones are never used
        sub = split_reply("\n".join(inner), _depth + 1)
        quoted_text = sub.own or sub.quoted  # a bare forward: what it forwarded
    return Split(own=strip_signature("\n".join(own)), quoted=quoted_text)


class _HTMLText(HTMLParser):
    """Visible text of an HTML mail; <blockquote> content comes out `> `-quoted."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "hr", "pre", "blockquote", "dt", "dd"}
    SKIP = {"script", "style", "head", "title", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.buf: list[str] = []
        self.depth = 0  # blockquote nesting
        self.skip = 0
        self.pre = 0

    def _flush(self, force: bool = False) -> None:
        text = "".join(self.buf)
        self.buf = []
        if not force and not text.strip():
            return  # block tags around nothing add no lines; <br> (force) always ends one
        for part in text.split("\n"):
            part = part if self.pre else re.sub(r"[ \t\r\f\v]+", " ", part).strip()
            self.lines.append(("> " * self.depth + part) if part else "")

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self._flush(force=tag == "br")
            if tag == "blockquote":
                self.depth += 1
            elif tag == "pre":
                self.pre += 1

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self._flush(force=True)

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self._flush()
            if tag == "blockquote":
                self.depth = max(0, self.depth - 1)
            elif tag == "pre":
                self.pre = max(0, self.pre - 1)
            if tag in ("p", "table", "blockquote", "h1", "h2", "h3"):  # not div: Gmail wraps every line in one
                self.lines.append("")

    def handle_data(self, data):
        if not self.skip:
            self.buf.append(data if self.pre else data.replace("\n", " "))


def html_to_text(html: str) -> str:
    """HTML mail -> plain text (stdlib only); quotes become `> ` lines so split_reply sees them."""
    parser = _HTMLText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser is lenient; anything it still chokes on loses markup only
        return tidy(re.sub(r"<[^>]+>", " ", html))
    parser._flush()
    return tidy("\n".join(parser.lines))
