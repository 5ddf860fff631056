"""The Draft screen with the real default model: streaming, Esc, edit-then-save, autosave, split, copy."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from tui_pilot import SIZE, draft, make_app, persona_profile, ready, sync, wait_for

from cope_local.paths import home
from cope_local.store import export_edit_pairs
from cope_local.tasks import get_task

pytestmark = pytest.mark.usefixtures("no_network")

ASK = "Can we move Friday's call to Monday?"


def to_end(area) -> None:
    area.focus()
    area.move_cursor(area.document.end)


@sync
async def test_a_draft_streams_into_the_output_and_goes_to_history():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = app.screen
        await draft(pilot, ASK)
        out = screen.query_one("#out").text
        r = screen.last_result
        assert r.text == out and out.strip()
        assert r.mode == "base" and r.stop_reason in ("length", "eos") and 1 <= r.steps <= 8
        assert screen.query_one("#prompt").text == ASK  # the input stays for a regenerate or an edit
        assert not screen.query_one("#out").read_only  # editable once done
        d = app.store.get_draft(screen.draft_id)
        assert d["prompt"] == ASK and d["generated"] == out and d["final"] is None
        assert d["messages"] == get_task("email-reply").draft_messages(ASK)
        assert "token limit" in str(screen.query_one("#out").border_subtitle)
        first = screen.draft_id
        before = screen.last_result
        await pilot.press("ctrl+r")  # regenerate: sampled, a new seed each time, a new history entry
        await wait_for(pilot, lambda: screen.last_result is not before and not screen.busy, what="the regenerate")
        assert screen.draft_id == first + 1 and screen.query_one("#out").text == screen.last_result.text
        assert [h.id for h in app.store.search("")] == [first + 1, first]


@sync
async def test_esc_stops_mid_stream_and_keeps_the_input():
    app = make_app(max_tokens=300)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = app.screen
        screen.query_one("#prompt").load_text("Write a long story about a lighthouse keeper and her cat.")
        await pilot.press("enter")
        out = screen.query_one("#out")
        await wait_for(pilot, lambda: len(out.text) >= 3, what="the first pieces")
        assert screen.busy
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.busy, timeout=10, what="the stop")
        r = screen.last_result
        assert r.stop_reason == "stopped" and 1 <= r.steps < 300
        assert out.text == r.text
        assert screen.query_one("#prompt").text.startswith("Write a long story")
        assert app.store.get_draft(screen.draft_id)["stop_reason"] == "stopped"
        # keys keep working after a stop: a new draft runs to its end
        app.max_tokens = 4
        await draft(pilot, "Say hello.")
        assert screen.last_result.stop_reason in ("length", "eos")


@sync
async def test_edit_then_save_stores_exactly_one_preference_pair():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = app.screen
        await draft(pilot, ASK)
        generated = screen.query_one("#out").text
        to_end(screen.query_one("#out"))
        await pilot.press(*" Cheers, Sam")
        await pilot.press("ctrl+s")
        await pilot.pause(0.05)
        pairs = export_edit_pairs(None)
        assert len(pairs) == 1
        p = pairs[0]
        assert p["chosen"] == generated + " Cheers, Sam" and p["rejected"] == generated
        assert p["prompt"] == ASK and p["messages"] == get_task("email-reply").draft_messages(ASK)
        assert p["task"] == "email-reply" and p["draft_id"] == screen.draft_id
        # saving again after more edits updates that pair, it does not add one
        await pilot.press(*"!")
        await pilot.press("ctrl+s")
        await pilot.pause(0.05)
        pairs = export_edit_pairs(None)
        assert len(pairs) == 1 and pairs[0]["chosen"].endswith("Sam!")
        # an unedited draft saved: no pair
        await draft(pilot, "Thank Ann for the flowers.")
        await pilot.press("ctrl+s")
        await pilot.pause(0.05)
        assert len(export_edit_pairs(None)) == 1
        assert app.store.get_draft(screen.draft_id)["saved"]


@sync
async def test_enter_sends_and_ctrl_j_adds_a_line():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        screen.query_one("#prompt").focus()
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert screen.query_one("#prompt").text == "a\nb\nc"
        assert not screen.busy and screen.last_result is None
        await pilot.press("ctrl+t")  # light/dark, remembered
        assert app.theme == "textual-light" and app.ui.restore("ui.theme") == "light"
        await pilot.press("f2", "f3", "f4", "f1")  # F1-F4 switch screens
        assert app.current_mode == "draft"


@sync
async def test_a_model_that_cannot_load_says_why_and_the_ui_keeps_working(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    app = make_app(model=str(bad))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.model_status.startswith("model error"), what="the load error")
        assert "broken.gguf" in app.model_status and not app.model_ready
        await pilot.press("f3", "f1")


@sync
async def test_a_restart_restores_the_autosaved_input_and_the_draft_being_edited():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = app.screen
        await draft(pilot, ASK)
        generated = screen.query_one("#out").text
        to_end(screen.query_one("#out"))
        await pilot.press(*" -- Sam")  # edited, not saved
        to_end(screen.query_one("#prompt"))
        await pilot.press(*" Thanks!")  # typed, not sent
    # no save, no quit handler: what is on disk is what autosave wrote as the user typed
    app2 = make_app()
    async with app2.run_test(size=SIZE) as pilot:
        screen = app2.screen
        assert screen.query_one("#prompt").text == ASK + " Thanks!"
        assert screen.query_one("#out").text == generated + " -- Sam"
        await ready(pilot)
        await pilot.press("ctrl+s")  # the restored edit still makes its pair
        await pilot.pause(0.05)
        pairs = export_edit_pairs(None)
        assert len(pairs) == 1 and pairs[0]["rejected"] == generated and pairs[0]["chosen"] == generated + " -- Sam"
    assert stat.S_IMODE(os.stat(home() / "cope.db").st_mode) == 0o600


@sync
async def test_split_view_compares_the_personal_draft_with_the_base_model():
    persona_profile("ro")
    app = make_app(profile="ro")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert "ro-demo.gguf" in app.model_status
        screen = app.screen
        await pilot.press("ctrl+b")
        assert app.split and screen.query_one("#out-base").display
        await draft(pilot, ASK)
        personal, base = screen.query_one("#out").text, screen.query_one("#out-base").text
        assert personal.strip() and base.strip() and personal != base  # the adapter matters
        assert str(screen.query_one("#out").border_subtitle).startswith("user")  # an adapter without DPO drafts alone
        assert str(screen.query_one("#out-base").border_subtitle).startswith("base")
        assert app.store.path.parent.name == "ro"  # drafts of a profile live in its folder
        # mode and alpha controls: base mode alone gives the base model's text
        screen.query_one("#mode").value = "base"
        screen.query_one("#alpha").value = "0.7"
        await pilot.pause(0.05)
        assert app.mode == "base" and app.alpha == 0.7
        await draft(pilot, ASK)
        assert screen.query_one("#out").text == base
        assert app.ui.restore("ui.alpha") == "0.7" and app.ui.restore("ui.mode") == "base"
        # mode auto on LaMP-7, where the contrast on such an adapter measured better: it drafts in cope mode
        screen.query_one("#mode").value = "auto"
        screen.query_one("#task").value = "lamp7"
        await pilot.pause(0.05)
        assert app.task_name == "lamp7" and app.mode == "auto"
        await draft(pilot, "Rain again today, so I stayed in and read.")
        assert str(screen.query_one("#out").border_subtitle).startswith("cope")


@sync
async def test_copy_writes_osc52_and_a_private_file():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await draft(pilot, ASK)
        await pilot.press("ctrl+o")
        path = home() / "clipboard.txt"
        assert path.read_text(encoding="utf-8") == app.screen.query_one("#out").text
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert app.clipboard == app.screen.query_one("#out").text


def test_the_drafting_path_never_imports_torch(default_model, tmp_path):
    code = (
        "import sys, threading\n"
        "from tui.app import CopeApp\n"
        "from tui.engine import Engine, Sources\n"
        "from cope_local.decode import GenConfig\n"
        "import cope_local.cli\n"
        "cope_local.cli.build_parser()\n"
        "e = Engine(threads=1); e.load(Sources())\n"
        "r = e.stream([{'role': 'user', 'content': 'hi'}], GenConfig(max_tokens=2), threading.Event(), lambda p: None)\n"
        "assert r.steps >= 1, r\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, COPE_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cope_tui_is_a_command():
    from cope_local.cli import build_parser

    args = build_parser().parse_args(["tui", "--no-profile", "--max-tokens", "5", "--theme", "light"])
    assert args.func.__module__ == "cope_local.commands.tui"
    assert args.max_tokens == 5 and args.no_profile and args.theme == "light"
