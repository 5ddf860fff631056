"""Mail ingest on small mbox / Maildir / .eml fixtures built here (no real mail in the repo)."""

from __future__ import annotations

import base64
import mailbox
import time
from email.header import Header
from pathlib import Path

import pytest

from cope_local.ingest import IngestConfig, ingest
from cope_local.ingest.clean import html_to_text, split_reply, strip_signature

ME = "ro@loft.example"


def raw(headers: dict, body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in headers.items()).encode("ascii")
    return head + b"\n" + body


def msg(frm, subject, body: bytes, date="Mon, 03 Jun 2024 09:00:00 +0000", to=ME, ctype="text/plain; charset=utf-8",
        cte="8bit", **extra) -> bytes:
    headers = {"From": frm, "To": to, "Subject": subject, "Date": date, "MIME-Version": "1.0",
               "Content-Type": ctype, "Content-Transfer-Encoding": cte}
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return raw(headers, body)


INBOX = [
    msg("Alice <alice@example.org>", "Mainsail", b"Can you fix my mainsail by Friday?\n\nAlice\n", Message_ID="<a1@example.org>"),
    msg("Dave <dave@example.org>", "Lunch", b"Lunch on Thursday?\n", date="Tue, 04 Jun 2024 10:00:00 +0000",
        Message_ID="<d1@example.org>"),
    msg("Dave <dave@example.org>", "Lunch", b"Old lunch thread, weeks ago.\n", date="Tue, 02 Apr 2024 10:00:00 +0000"),
]

REPLY_GMAIL = (b"aye, friday works.\n\nbring her in early.\n\n"
               b"On Mon, 3 Jun 2024 at 09:00, Alice <alice@example.org> wrote:\n"
               b"> Can you fix my mainsail by Friday?\n>\n> Alice\n\n"
               b"-- \nRo Quayle\nSail Loft, Pier 4\n")

REPLY_OUTLOOK = (b"you're right, new invoice attached.\n\nThanks,\nRo\n\n"
                 b" -----Original Message-----\n"
                 b"From: \tBob Smith  \nSent:\tMonday, June 03, 2024 10:05 AM\nTo:\tQuayle, Ro\nSubject:\tinvoice\n\n"
                 b"The invoice says 180 but we agreed 150.\n\n"
                 b"Bob Smith\nHarbour Supplies Ltd\nTel: 555 123 4567\n")

HTML_1252 = ("<html><head><style>p {color: red}</style></head><body>"
             "<p>we\u2019ll be there at <b>noon</b> &amp; bring the flags.</p>"
             "<div class=\"gmail_quote\">On Tue, Jun 4, 2024 Carol &lt;carol@example.org&gt; wrote:"
             "<blockquote>Are you coming to the regatta?</blockquote></div></body></html>").encode("cp1252")

KOI8 = "привет, увидимся в субботу.\n\nSent from my iPhone\n".encode("koi8-r")


def sent_messages() -> list[bytes]:
    import quopri

    return [
        msg(f"Ro Quayle <{ME}>", "Re: Mainsail", REPLY_GMAIL, to="alice@example.org", In_Reply_To="<a1@example.org>",
            date="Mon, 03 Jun 2024 11:00:00 +0000"),
        msg(ME, "RE: invoice", REPLY_OUTLOOK, to="bob@example.org"),
        msg(ME, "Re: Regatta", quopri.encodestring(HTML_1252), to="carol@example.org",
            ctype="text/html; charset=windows-1252", cte="quoted-printable"),
        msg(ME, Header("Суббота", "koi8-r").encode(), base64.encodebytes(KOI8), to="ivan@example.org",
            ctype="text/plain; charset=koi8-r", cte="base64"),
        msg(ME, "Fw: newsletter", b"\n-----Original Message-----\nFrom: news@example.org\nSent: Monday\nTo: Ro\n"
            b"Subject: newsletter\n\nBig sale on rope.\n"),  # a bare forward: nothing of Ro's
        msg(ME, "RE: invoice", REPLY_OUTLOOK, to="bob@example.org"),  # sent twice: a duplicate
        msg(ME, "Re: Lunch", b"sounds good, see you at one.\n", to="dave@example.org",
            date="Tue, 04 Jun 2024 11:00:00 +0000"),
        msg(ME, "bad bytes", b"caf\xc3\xa9 at the pier \xff tomorrow\n", to="eve@example.org"),
        msg("Alice <alice@example.org>", "stray", b"A message of Alice's that landed in Sent.\n"),
    ]


EXPECTED = {  # subject -> (output, input, input_from)
    "Re: Mainsail": ("aye, friday works.\n\nbring her in early.", "Can you fix my mainsail by Friday?\n\nAlice", "in-reply-to"),
    "RE: invoice": ("you're right, new invoice attached.\n\nThanks,\nRo", "The invoice says 180 but we agreed 150.", "quoted"),
    "Re: Regatta": ("we\u2019ll be there at noon & bring the flags.", "Are you coming to the regatta?", "quoted"),
    "Суббота": ("привет, увидимся в субботу.", None, "none"),
    "Re: Lunch": ("sounds good, see you at one.", "Lunch on Thursday?", "subject-match"),
    "bad bytes": ("café at the pier \ufffd tomorrow", None, "none"),
}


def write_mbox(path: Path, messages: list[bytes]) -> Path:
    box = mailbox.mbox(str(path))
    for m in messages:
        box.add(m)
    box.flush()
    box.close()
    return path


def check(items):
    got = {i.meta["subject"]: (i.output, i.input, i.meta["input_from"]) for i in items}
    assert got == EXPECTED


def test_mbox_with_me(tmp_path):
    inbox = write_mbox(tmp_path / "inbox.mbox", INBOX)
    out = write_mbox(tmp_path / "outgoing.mbox", sent_messages())
    items, report = ingest([out, inbox], me=[ME.upper()])
    check(items)
    assert report.kept == 6
    assert report.skipped == {"not_from_me": 4, "empty_after_cleaning": 1, "duplicate": 1}
    assert report.inputs == {"in-reply-to": 1, "quoted": 2, "subject-match": 1, "none": 2}
    assert len({i.id for i in items}) == 6


def test_mbox_sent_folder_without_me(tmp_path):
    write_mbox(tmp_path / "INBOX", INBOX)  # no suffix: sniffed as mbox by its "From " line
    write_mbox(tmp_path / "Sent", sent_messages())
    items, report = ingest([tmp_path])
    # Without --me every message in Sent counts, Alice's stray one too.
    assert {i.meta["subject"] for i in items} == set(EXPECTED) | {"stray"}
    assert report.skipped["not_from_me"] == 3


def test_maildir(tmp_path):
    root = mailbox.Maildir(str(tmp_path / "Maildir"), create=True)
    for m in INBOX:
        root.add(m)
    sent = root.add_folder("Sent")
    for m in sent_messages():
        sent.add(m)
    # multipart/alternative (plain wins), a PDF attachment ignored, ISO-8859-1 text, interleaved > quotes
    alt = (b"From: " + ME.encode() + b"\nTo: hans@example.org\nSubject: Re: Segel\nDate: Wed, 05 Jun 2024 09:00:00 +0000\n"
           b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"MIX\"\n\n"
           b"--MIX\nContent-Type: multipart/alternative; boundary=\"ALT\"\n\n"
           b"--ALT\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n"
           b"Hans schrieb:\n> Wann ist das Segel fertig?\nam freitag.\n> Und der Preis?\n150 euro. gr\xfc\xdfe!\n"
           b"--ALT\nContent-Type: text/html; charset=iso-8859-1\n\n<p>HTML VERSION</p>\n--ALT--\n"
           b"--MIX\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=a.pdf\n"
           b"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--MIX--\n")
    sent.add(alt)
    items, report = ingest([tmp_path / "Maildir"])  # no --me: the .Sent folder is the user's
    got = {i.meta["subject"]: (i.output, i.input, i.meta["input_from"]) for i in items}
    assert got.pop("Re: Segel") == ("am freitag.\n150 euro. grüße!", "Wann ist das Segel fertig?\nUnd der Preis?", "quoted")
    got.pop("stray")
    assert got == EXPECTED
    assert report.skipped["not_from_me"] == 3


def test_eml_and_in_reply_to_across_files(tmp_path):
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "question.eml").write_bytes(INBOX[0])
    (tmp_path / "mail" / "answer.eml").write_bytes(sent_messages()[0])
    items, _ = ingest([tmp_path / "mail"], me=[ME])
    assert [(i.output, i.input) for i in items] == [EXPECTED["Re: Mainsail"][:2]]


def test_ten_megabyte_message_is_cut_with_a_note(tmp_path):
    body = b"the sea is wide and deep. " * 420_000  # ~10.9 MB
    path = write_mbox(tmp_path / "sent.mbox", [msg(ME, "big", body), msg(ME, "small", b"a short one.\n")])
    t0 = time.perf_counter()
    items, report = ingest([path], me=[ME])
    assert time.perf_counter() - t0 < 10
    big = next(i for i in items if i.meta["subject"] == "big")
    assert big.meta["truncated"] is True
    assert len(big.output) <= IngestConfig().max_output_chars and big.output.startswith("the sea is wide")
    assert any("MB message cut to its first 200,000 characters" in n for n in report.notes)
    assert report.truncated == 1


def test_no_me_and_no_sent_folder_says_so(tmp_path):
    path = write_mbox(tmp_path / "archive.mbox", INBOX)
    items, report = ingest([path])
    assert items == [] and report.skipped == {"not_from_me": 3}
    assert any("pass --me" in n for n in report.notes)


# ---- the cleaning rules on their own -----------------------------------------------------------

def test_outlook_chain_takes_the_nearest_quoted_message():
    body = ("promise\n\n -----Original Message-----\nFrom: \tNelson, Michelle  \nSent:\tTuesday, November 27, 2001 10:42 AM\n"
            "To:\tMaggi, Mike\nSubject:\tRE: \n\ngod.  i am going to beat you!\n\n -----Original Message-----\n"
            "From: \tMaggi, Mike  \nSent:\tTuesday, November 27, 2001 10:35 AM\nTo:\tNelson, Michelle\nSubject:\tRE: \n\n"
            "as opposed to\n")
    split = split_reply(body)
    assert (split.own, split.quoted) == ("promise", "god.  i am going to beat you!")


def test_wrapped_from_header_and_bare_forward():
    body = ("see below\n\n-----Original Message-----\nFrom: orders@shop.example\n[mailto:orders@shop.example]\n"
            "Sent: Thursday, December 13, 2001 9:53 AM\nTo: Whitt, Mark\nSubject: order\n\n\nYour order shipped.\n")
    assert split_reply(body).quoted == "Your order shipped."
    fwd = ("For your e-mail.\n\n-----Original Message-----\nFrom: Whitt, Mark \nSent: Monday\nTo: Tycholiz, Barry\n"
           "Subject: FW: top ten\n\n\n-----Original Message-----\nFrom: Murphy, Tim\nSent: Friday\nTo: Bump, Dan\n"
           "Subject: FW: top ten\n\nTOP TEN USES\n1. HEALTH CLUB\n")
    split = split_reply(fwd)
    assert (split.own, split.quoted) == ("For your e-mail.", "TOP TEN USES\n1. HEALTH CLUB")


def test_lotus_notes_forward():
    body = ("Pls have dave set up with a second screen.\n\nBarry Tycholiz\n"
            "---------------------- Forwarded by Barry Tycholiz/NA/Enron on 04/10/2001 04:47 PM ---------------------------\n\n\n"
            "Dave Fuller@ECT\n04/10/2001 03:09 PM\nTo:\tBarry Tycholiz/NA/Enron@ENRON\ncc:\t \n\nSubject:\tEOL\n\n"
            "Barry,\n\nPlease authorize a second screen.\n\nThanks,\n\nDave\n")
    split = split_reply(body)
    assert split.own == "Pls have dave set up with a second screen.\n\nBarry Tycholiz"
    assert split.quoted == "Barry,\n\nPlease authorize a second screen.\n\nThanks,\n\nDave"


@pytest.mark.parametrize("text, expected", [
    ("I would appreciate it.\n\nThanks,\nJason Wolfe\nTrading Analyst\nEnron North America\n713-853-0568",
     "I would appreciate it.\n\nThanks,\nJason Wolfe"),
    ("Her name is Anne.\n\nRegards\n\nLouise\n\nLouise Kitchen\nChief Operating Officer\nTel:  713 853 3488\nFax: 713 646 2308",
     "Her name is Anne.\n\nRegards\n\nLouise"),
    ("Call me at 713 853 3488 tomorrow.\nThanks", "Call me at 713 853 3488 tomorrow.\nThanks"),  # prose keeps its number
    ("switch deal is off.\n--------------------------\nSent from my BlackBerry Wireless Handheld (www.BlackBerry.net)",
     "switch deal is off."),
    (("ok\n\n********************\nThis e-mail is the property of Enron Corp. and may contain confidential and privileged "
      "material for the sole use of the intended recipient."), "ok"),
    ("see attached\n<<Q3 plan.xls>>\n\ncheers,\n--jay", "see attached\n\ncheers,\n--jay"),
])
def test_signatures(text, expected):
    assert strip_signature(text) == expected


def test_html_to_text():
    html = ("<div>line one<br>line&nbsp;two</div><script>var x=1;</script><ul><li>a</li><li>b</li></ul>"
            "<blockquote>quoted<blockquote>deeper</blockquote></blockquote><p>after</p>")
    assert html_to_text(html) == "line one\nline two\na\nb\n> quoted\n> > deeper\n\nafter"
    gmail = ('<div dir="ltr"><div>hi there</div><div><br></div><div>second para</div></div><br>'
             '<div class="gmail_quote"><div class="gmail_attr">On Tue, Jun 4, 2024 at 9:00 AM Carol &lt;'
             '<a href="mailto:c@x.org">c@x.org</a>&gt; wrote:<br></div><blockquote class="gmail_quote">'
             '<div dir="ltr">Are you coming?</div></blockquote></div>')
    split = split_reply(html_to_text(gmail))
    assert (split.own, split.quoted) == ("hi there\n\nsecond para", "Are you coming?")


@pytest.mark.parametrize("body, own, quoted", [
    ("chase this asap-----Original Message-----\nTo: Faith\nSent: Oct 9, 2001 10:21a\nSubject: q\n\nGross margin?\n",
     "chase this asap", "Gross margin?"),
    ("you are up early....\n\nBT\n\n[Tycholiz, Barry]  -----Original Message-----\nFrom: X\nSent: Y\nTo: Z\nSubject: s\n\nhello\n",
     "you are up early....\n\nBT", "hello"),
    ("Gerald too.\n\n -----Original Appointment-----\nFrom: X\nSent: Y\nTo: Z\nSubject: meeting\n\nWhen: Monday\n",
     "Gerald too.", "When: Monday"),
    ("ok?\n\n______________________________\nGet your FREE download of MSN Explorer at http://explorer.msn.com/intl.asp\n",
     "ok?", None),
])
def test_odd_markers_and_webmail_footers(body, own, quoted):
    split = split_reply(body)
    assert (split.own, split.quoted) == (own, quoted)
