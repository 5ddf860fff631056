"""Ingest of JSONL / JSON / CSV rows, LaMP profiles, text folders, and the files it must skip."""

from __future__ import annotations

import csv
import json
import os
from importlib.resources import files

import pytest

from cope_local.errors import CopeError
from cope_local.ingest import IngestConfig, ingest, items_from_records, read_items, write_items
from cope_local.ingest.items import cap_text


def test_jsonl_rows_dedupe_and_bad_lines(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(
        '{"input": "Can we meet?", "output": "sure, tuesday."}\n'
        '{"output": "a post with no input"}\n'
        '{"input": "Can we meet?", "output": "Sure,   TUESDAY."}\n'  # same text, other case/spacing: duplicate
        'not json\n'
        '{"score": 5}\n'
        '\n', encoding="utf-8")
    items, report = ingest([path])
    assert [(i.input, i.output) for i in items] == [("Can we meet?", "sure, tuesday."), (None, "a post with no input")]
    assert report.skipped == {"duplicate": 1, "bad_row": 1, "no_text_field": 1}
    assert report.examples["bad_row"] == ["history.jsonl:4"]
    assert items[0].meta["input_from"] == "row" and items[1].meta["input_from"] == "none"


def test_lamp_user_row_uses_profile_not_queries(tmp_path):
    user = {"user_id": "u1", "task": "LaMP-7", "profile": [{"text": "tweet one"}, {"text": "tweet two"}],
            "queries": [{"id": "q", "input": "Paraphrase ...", "output": "SECRET GOLD"}]}
    path = tmp_path / "u1.jsonl"
    path.write_text(json.dumps(user) + "\n", encoding="utf-8")
    items, _ = ingest([path])
    assert [i.output for i in items] == ["tweet one", "tweet two"] and all(i.input is None for i in items)
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps(user) + "\n" + json.dumps({**user, "user_id": "u2"}) + "\n", encoding="utf-8")
    with pytest.raises(CopeError, match="holds 2 users"):
        ingest([two])


def test_lamp_fields_follow_the_task():
    rows = [{"id": "1", "title": "Storm hits coast", "text": "A storm hit the coast on Monday."}]
    default = items_from_records(rows, "news.jsonl")[0]
    assert (default.input, default.output) == ("Storm hits coast", "A storm hit the coast on Monday.")
    from cope_local.tasks import get_task

    t = get_task("headline")
    cfg = IngestConfig(target_fields=t.target_fields, input_fields=t.input_fields)
    head = items_from_records(rows, "news.jsonl", cfg)[0]
    assert (head.input, head.output) == ("A storm hit the coast on Monday.", "Storm hits coast")
    assert head.meta["id"] == "1"


def test_csv_and_json(tmp_path):
    with open(tmp_path / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["title", "text", "score"])
        w.writeheader()
        w.writerow({"title": "Harbour Café", "text": "great chowder, slow service", "score": 4})
    (tmp_path / "posts.json").write_text(json.dumps(["first post", {"output": "second post"}]), encoding="utf-8")
    items, _ = ingest([tmp_path / "reviews.csv", tmp_path / "posts.json"])
    assert [(i.input, i.output) for i in items] == [("Harbour Café", "great chowder, slow service"),
                                                    (None, "first post"), (None, "second post")]
    assert items[0].meta["score"] == "4" and items[0].meta["title"] == "Harbour Café"


def test_text_folder_binary_unsupported_and_broken_link(tmp_path):
    d = tmp_path / "writing"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("First line.\r\nSecond line.\r\n", encoding="utf-8")
    (d / "b.md").write_text("---\ntitle: \"On knots\"\n---\nA bowline never slips.\n", encoding="utf-8")
    (d / "sub" / "c.md").write_text("# Tides\n\nThey come and go.\n", encoding="utf-8")
    (d / "latin.txt").write_bytes("na\xefve caf\xe9 \x93quotes\x94".encode("latin-1"))
    (d / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (d / "sheet.xlsx").write_bytes(b"PK\x03\x04" + bytes(100))
    (d / "notes.docx").write_text("not really a docx", encoding="utf-8")
    (d / ".hidden.txt").write_text("ignored", encoding="utf-8")
    os.symlink(d / "missing.txt", d / "dangling.txt")
    items, report = ingest([d])
    got = {i.source: (i.output, i.meta.get("title")) for i in items}
    assert got == {
        "writing/a.txt": ("First line.\nSecond line.", None),
        "writing/b.md": ("A bowline never slips.", "On knots"),
        "writing/latin.txt": ("naïve café “quotes”", None),
        "writing/sub/c.md": ("They come and go.", "Tides"),
    }
    assert report.skipped == {"binary_file": 2, "unsupported_file_type": 1, "unreadable_file": 1}
    assert "latin.txt: not UTF-8, read as Windows-1252" in report.notes


def test_binary_file_given_directly_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "dump.bin"
    path.write_bytes(bytes(range(256)) * 10)
    items, report = ingest([path])
    assert items == [] and report.skipped == {"binary_file": 1}


def test_missing_path_and_bad_me(tmp_path):
    with pytest.raises(CopeError, match="no such file or folder"):
        ingest([tmp_path / "nope"])
    with pytest.raises(CopeError, match="not an email address"):
        ingest([tmp_path], me=["ro"])


def test_length_caps(tmp_path):
    long = " ".join(["word"] * 3000)  # 14,999 chars
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"input": "x" * 50, "output": long}) + "\n", encoding="utf-8")
    items, report = ingest([path], config=IngestConfig(max_output_chars=100, max_input_chars=20))
    assert items[0].output == " ".join(["word"] * 20) and len(items[0].input) == 20
    assert items[0].meta["truncated"] is True and report.truncated == 1
    assert cap_text("One two three. Four five six", 20) == ("One two three.", True)
    assert cap_text("One. Two three four", 12) == ("One. Two", True)  # a sentence end too early: cut at a word


def test_items_roundtrip_private(tmp_path):
    items, _ = ingest([files("cope_local").joinpath("data/persona/history.jsonl")])
    dest = write_items(tmp_path / "items.jsonl", items)
    assert os.stat(dest).st_mode & 0o777 == 0o600
    assert read_items(dest) == items
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "output": "x"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(CopeError, match="bad.jsonl:2"):
        read_items(tmp_path / "bad.jsonl")


def test_persona_history_is_complete():
    folder = files("cope_local").joinpath("data/persona")
    items, report = ingest([folder.joinpath("history.jsonl")])
    assert report.kept == 40 and not report.skipped
    assert all(i.input and i.output == i.output.lower() and i.output.endswith("fair winds, —ro") for i in items)
    prompts = json.loads(folder.joinpath("prompts.json").read_text(encoding="utf-8"))
    assert len(prompts) == 3 and not {p for p in prompts} & {i.input for i in items}
    assert "invented" in folder.joinpath("README.md").read_text(encoding="utf-8")
