"""The Profiles screen: create (kept/skipped shown), use, switch adapters, train through the CLI child."""

from __future__ import annotations

import json

import pytest
from textual.widgets import Button
from tui_pilot import PERSONA, SIZE, make_app, persona_profile, ready, sync, wait_for

from convert.synthetic import write_random_lora
from cope_local import profile as profiles
from cope_local.models import resolve_model
from tui.profiles import ProfileItem, StageRow
from tui.training import STAGES, parse_line

pytestmark = pytest.mark.usefixtures("no_network")


def report(app) -> str:
    return str(app.screen.query_one("#create-report").render())


async def profiles_screen(app, pilot, select: str | None = None):
    """Switch to the Profiles screen, highlighting profile `select` if given -> the screen."""
    await app.switch_mode("profiles")
    await pilot.pause(0.05)
    screen = app.screen
    if select is not None:
        screen.query_one("#prof-list").index = [i.profile for i in screen.query(ProfileItem)].index(select)
    return screen


@sync
async def test_create_a_profile_from_paths_showing_what_was_kept(tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    (few / "a.txt").write_text("one note of mine")
    (few / "b.bin").write_bytes(b"\x00\x01\x02" * 50)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await app.switch_mode("profiles")
        await pilot.press("n")
        modal = app.screen
        modal.query_one("#new-name").value = "ro"
        modal.query_one("#new-paths").value = str(few)
        await pilot.click("#check")
        await wait_for(pilot, lambda: "reading" not in report(app), what="the check")
        text = report(app)
        assert "would keep 1 texts (too few" in text and "binary file" in text  # kept, skipped and why
        await pilot.pause(0.3)
        await pilot.click("#create-btn")
        await wait_for(pilot, lambda: "reading" not in report(app), what="the create")
        assert report(app).startswith("error:") and "ro" not in profiles.profile_names()
        modal.query_one("#new-paths").value = PERSONA
        await pilot.pause(0.3)  # a Button ignores clicks for 0.2 s after one (its press effect)
        await pilot.click("#create-btn")
        await wait_for(pilot, lambda: "reading" not in report(app) and "error" not in report(app), timeout=15,
                       what=lambda: f"create ({report(app)[:300]!r})")
        assert report(app).startswith("created profile ro: kept 40 texts")
        await pilot.pause(0.3)
        await pilot.click("#close")
        await pilot.pause(0.05)
        screen = app.screen
        assert screen.selected() == "ro" and "ro" in profiles.profile_names()
        assert "40 texts" in str(screen.query_one("#prof-info").render())
        assert screen.query_one("#from-edits").disabled  # from edits: needs a trained profile and 3 edit pairs
        await pilot.press("u")
        await ready(pilot)
        assert app.profile_name == "ro" and app.store.path == profiles.load_profile("ro").path / "cope.db"
        assert "no adapter" in app.model_status


@sync
async def test_switch_the_active_adapter_and_the_decoder_follows():
    folder = persona_profile("ro")
    second = write_random_lora(resolve_model(), folder / "adapters" / "ro-second.gguf", std=0.08, seed=7)
    app = make_app(profile="ro")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert "ro-demo.gguf" in app.model_status
        screen = await profiles_screen(app, pilot)
        assert screen.selected() == "ro"
        screen.query_one("#adapters").value = "ro-second.gguf"
        await pilot.press("a")
        await ready(pilot)
        assert profiles.active_adapter("ro") == second
        assert "ro-second.gguf" in app.model_status and app.engine.sources.adapter == str(second)
        # the no-profile entry: base model, profile-less store
        screen.query_one("#prof-list").index = 0
        await pilot.press("u")
        await ready(pilot)
        assert app.profile_name is None and not app.engine.has_adapter


@sync
async def test_train_runs_the_cli_in_a_child_with_progress_per_stage():
    persona_profile("ro", adapter=False)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await profiles_screen(app, pilot, select="ro")
        screen.action_train(stages=["inputs"])  # the Train button runs all stages; one is enough here
        await wait_for(pilot, lambda: screen.training is None and screen.training_profile is None, timeout=90,
                       what="the training child")
        rows = {r.stage: r for r in screen.query(StageRow)}
        assert rows["inputs"].query_one("ProgressBar").progress == 1.0
        assert rows["sft"].query_one("ProgressBar").progress == 0
        assert "the chosen stages ran" in str(screen.query_one("#status").render())
        marker = json.loads((profiles.load_profile("ro").stages_dir / "inputs.json").read_text())
        assert marker["state"] == "done"


@sync
async def test_train_plus_dpo_runs_the_child_with_the_papers_stages():
    persona_profile("ro", adapter=False)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await profiles_screen(app, pilot, select="ro")
        await pilot.press("d")  # the +DPO button's key
        await wait_for(pilot, lambda: screen.training is not None, timeout=30, what="the training child")
        assert screen.training.cmd[-2:] == ["--set", "dpo=true"]
        assert screen.query_one("#train", Button).disabled and screen.query_one("#train-dpo", Button).disabled
        await pilot.press("x")
        await wait_for(pilot, lambda: screen.training_profile is None, timeout=120, what="the child to stop")
        assert not screen.query_one("#train-dpo", Button).disabled


def test_progress_lines_of_the_pipeline_parse():
    p = parse_line("sft: step 3/40  loss 2.103  0.50 steps/s  ETA 1:05")
    assert (p.stage, p.fraction, p.loss, p.eta) == ("sft", 3 / 40, 2.103, "1:05")
    p = parse_line("dpo: step 8/8 loss 0.6931 margin +0.0000 acc 0.50 2.1 s/step ETA 0:00")
    assert (p.stage, p.fraction, p.loss) == ("dpo", 1.0, 0.6931)
    assert parse_line("sft: 4 steps, loss 4.882 -> 3.105").loss == 3.105  # the stage's summary: the last loss
    assert parse_line("negatives: up to date").state == "done"
    assert parse_line("dpo: off (the SFT adapter is exported; --dpo adds the paper's negatives + DPO)").state == "off"
    assert parse_line("inputs: 12/40 inputs generated (1.2/s)").fraction == 0.3
    assert parse_line("tam: step 1/2  loss 3.0").stage == "sft"
    assert parse_line("sft: stopped at step 5/40; run the same command again to resume").state == "stopped"
    assert parse_line("training profile 'ro' (task email-reply)") is None
    assert parse_line("preparing SmolLM2 for training") is None


def test_stages_match_the_pipeline():
    from cope_local.train.pipeline import STAGES as PIPELINE_STAGES

    assert STAGES == PIPELINE_STAGES


@sync
async def test_cancel_interrupts_training_and_train_again_resumes(monkeypatch, pytestconfig):
    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    persona_profile("ro", adapter=False)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = await profiles_screen(app, pilot, select="ro")
        screen.action_train(stages=["inputs", "pairs", "sft"])
        # SFT on 40 texts takes tens of optimizer steps: cancel once it reports its first one
        await wait_for(pilot, lambda: "sft" in screen.seen_stages, timeout=120, what="the sft stage")
        await pilot.press("x")
        await wait_for(pilot, lambda: screen.training_profile is None, timeout=120, what="the child to stop")
        assert "stopped; Train (t) resumes" in str(screen.query_one("#status").render())
        stages = profiles.load_profile("ro").stages_dir
        for done in ("inputs", "pairs"):  # kept: a rerun skips them
            assert json.loads((stages / f"{done}.json").read_text())["state"] == "done"
        assert json.loads((stages / "sft.json").read_text())["state"] == "running"  # interrupted, resumable
        assert not (stages / "sft" / "adapter").exists()
        assert list((stages / "sft").rglob("*.pt"))  # the checkpoint a rerun resumes from


@sync
async def test_from_edits_learns_from_three_edited_drafts_and_the_next_draft_uses_it(monkeypatch, pytestconfig):
    from test_train_edits import EDITS, save_edits

    from cope_local.cli import main

    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    persona_profile("ro", adapter=False)
    assert main(["profile", "train", "ro", "--max-steps", "1", "--set", "dpo=false", "--set", "max_target_tokens=32"]) == 0
    trained = profiles.active_adapter("ro")
    save_edits("ro", EDITS[:3])
    app = make_app(profile="ro")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = await profiles_screen(app, pilot)
        button = screen.query_one("#from-edits")
        assert not button.disabled and "(3)" in str(button.label)
        await pilot.press("e")
        await wait_for(pilot, lambda: screen.training is None and screen.training_profile is None, timeout=120,
                       what="the from-edits child")
        assert "learned from your edits" in str(screen.query_one("#status").render())
        new = profiles.active_adapter("ro")
        assert new != trained
        rows = {r.stage: r for r in screen.query(StageRow)}
        assert rows["dpo"].query_one("ProgressBar").progress == 1.0 and rows["sft"].query_one("ProgressBar").progress == 0
        await ready(pilot)
        assert app.engine.sources.adapter == str(new)  # the next draft uses the new adapter
