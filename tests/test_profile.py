"""Profiles on disk and the `cope profile` commands (COPE_HOME is a tmp dir: see conftest)."""

from __future__ import annotations

import errno
import importlib
import json
import mailbox
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

from cope_local import profile as profiles
from cope_local.errors import CopeError
from cope_local.paths import profiles_dir

PERSONA = str(files("cope_local").joinpath("data/persona/history.jsonl"))


@pytest.fixture
def cope(monkeypatch, tmp_path):
    """cope_local.cli.main, with COPE_HOME in tmp and without command modules not written yet."""
    from cope_local import cli

    monkeypatch.setenv("COPE_HOME", str(tmp_path / "home"))
    usable = []
    for name in cli.COMMAND_MODULES:
        try:
            importlib.import_module(name)
            usable.append(name)
        except ModuleNotFoundError as exc:  # another module of the CLI that does not exist yet
            if not (exc.name and name.startswith(exc.name)):
                raise
    monkeypatch.setattr(cli, "COMMAND_MODULES", usable)
    return cli.main


def rows(tmp_path, n):
    path = tmp_path / f"h{n}.jsonl"
    path.write_text("".join(json.dumps({"input": f"q{i}", "output": f"answer number {i}"}) + "\n" for i in range(n)),
                    encoding="utf-8")
    return path


def test_create_list_show_path_delete(cope, capsys, tmp_path):
    assert cope(["profile", "create", "ro", "--from", PERSONA, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == 40 and out["report"]["kept"] == 40 and not out["dry_run"]
    folder = Path(out["path"])
    assert folder == tmp_path / "home" / "profiles" / "ro"
    assert sorted(p.name for p in folder.iterdir()) == ["adapters", "ingest_report.json", "items.jsonl", "profile.toml", "stages"]
    for name in ("items.jsonl", "profile.toml", "ingest_report.json"):
        assert os.stat(folder / name).st_mode & 0o777 == 0o600
    assert os.stat(folder).st_mode & 0o777 == 0o700

    p = profiles.load_profile("ro")
    assert (p.task, p.me, p.sources, p.model) == ("email-reply", [], [PERSONA], None)
    items = p.items()
    assert len(items) == 40 and items[0].output.endswith("fair winds, —ro")

    assert cope(["profile", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["items"], r["active_adapter"]) for r in listed] == [("ro", 40, None)]
    assert cope(["profile", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["ro", "email-reply", "40", "-"]
    assert cope(["profile", "show", "ro", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ingest"]["kept"] == 40 and len(shown["examples"]) == 3 and shown["stages"] == []
    assert cope(["profile", "show", "ro"]) == 0
    assert "task: email-reply" in capsys.readouterr().out
    assert cope(["profile", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "home" / "profiles")
    assert cope(["profile", "path", "ro"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)

    assert cope(["profile", "create", "ro", "--from", PERSONA]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert cope(["profile", "delete", "ro"]) == 2  # stdin is not a terminal: needs --yes
    assert "add --yes" in capsys.readouterr().err
    assert cope(["profile", "delete", "ro", "--yes"]) == 0
    assert not folder.exists() and os.listdir(profiles_dir()) == []
    assert cope(["profile", "show", "ro"]) == 2
    assert "not found" in capsys.readouterr().err


def test_dry_run_counts_and_writes_nothing(cope, capsys, tmp_path):
    box = mailbox.mbox(str(tmp_path / "mail.mbox"))
    for i in range(10):
        box.add(f"From: ro@loft.example\nTo: a@example.org\nSubject: note {i}\n\nnote number {i}, fair winds.\n")
    box.add("From: ro@loft.example\nSubject: again\n\nnote number 3, fair winds.\n")  # duplicate text
    box.add("From: other@example.org\nSubject: hi\n\nhello ro\n")
    box.flush()
    assert cope(["profile", "create", "me", "--from", str(tmp_path / "mail.mbox"), "--me", "ro@loft.example", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kept 10 items" in out and "skipped 2: 1 not from me, 1 duplicate" in out
    assert os.listdir(profiles_dir()) == []
    assert cope(["profile", "create", "me", "--from", str(tmp_path / "mail.mbox"), "--me", "ro@loft.example",
                 "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert (report["kept"], report["skipped"]) == (10, {"not_from_me": 1, "duplicate": 1})


def test_too_small_history(cope, capsys, tmp_path):
    small = rows(tmp_path, 5)
    assert cope(["profile", "create", "tiny", "--from", str(small)]) == 2
    err = capsys.readouterr().err
    assert "only 5 usable texts found, need at least 8" in err and "add more of your own writing" in err
    assert os.listdir(profiles_dir()) == []
    assert cope(["profile", "create", "tiny", "--from", str(small), "--dry-run"]) == 2  # reports, then the same error
    captured = capsys.readouterr()
    assert "kept 5 items" in captured.out and "need at least 8" in captured.err
    with pytest.raises(CopeError, match="is --me the address you send from"):
        box = mailbox.mbox(str(tmp_path / "inbox.mbox"))
        box.add("From: a@example.org\nSubject: x\n\nhello\n")
        box.flush()
        profiles.create_profile("x", [tmp_path / "inbox.mbox"], me=["ro@loft.example"])


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a b", "x" * 65, "a..b", "-dash"])
def test_bad_names(name):
    with pytest.raises(CopeError, match="profile name"):
        profiles.validate_name(name)


def test_full_disk_leaves_no_profile(monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(profiles, "write_items", full)
    with pytest.raises(CopeError, match=r"cannot write the profile \(No space left on device\); free disk space"):
        profiles.create_profile("ro", [PERSONA])
    assert os.listdir(profiles_dir()) == []


def test_active_adapter_pointer(tmp_path):
    p, _, _ = profiles.create_profile("ro", [rows(tmp_path, 8)], task="post", me=["Ro@Loft.Example"])
    assert p.me == ["ro@loft.example"] and profiles.active_adapter("ro") is None and profiles.active_tam(p) is None
    a1 = p.adapters_dir / "user-1.gguf"
    a1.write_bytes(b"GGUF")
    tam = tmp_path / "tam.gguf"
    tam.write_bytes(b"GGUF")
    profiles.set_active_adapter("ro", a1, tam=tam)
    assert json.loads(p.active_path.read_text())["adapter"] == "adapters/user-1.gguf"  # relative: the folder can move
    assert profiles.active_adapter(p) == a1 and profiles.active_tam(p) == tam.resolve()
    assert os.stat(p.active_path).st_mode & 0o777 == 0o600
    with pytest.raises(CopeError, match="no such adapter file"):
        profiles.set_active_adapter(p, p.adapters_dir / "missing.gguf")
    assert profiles.active_adapter(p) == a1  # a failed switch keeps the old one
    a1.unlink()
    with pytest.raises(CopeError, match="which is missing; run `cope profile train ro`"):
        profiles.active_adapter(p)
    assert "active_error" in profiles.describe("ro")


def test_profile_toml_roundtrip_and_py310_reader(tmp_path):
    p, _, _ = profiles.create_profile("ro", [rows(tmp_path, 8)])
    p.extra["train"] = {"epochs": 2, "lr": 0.0001, "device": "cpu", "lora": {"r": 8, "targets": ["q_proj", "v_proj"]}}
    p.model = "smollm2-135m"
    p.sources.append('C:\\mail\\"Sent" ünïcode\x7f')
    profiles.save_profile(p)
    again = profiles.load_profile("ro")
    assert (again.extra, again.model, again.sources) == (p.extra, p.model, p.sources)
    text = p.toml_path.read_text(encoding="utf-8")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert profiles._load_toml_subset(text, p.toml_path) == tomllib.loads(text)
    with pytest.raises(CopeError, match="without tomllib"):
        profiles._load_toml_subset("name = 'single quoted'\n", p.toml_path)


def test_no_heavy_imports():
    code = ("import sys, cope_local.ingest, cope_local.tasks, cope_local.profile, cope_local.commands.profile; "
            "heavy = {'torch', 'transformers', 'llama_cpp', 'peft', 'trl'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
