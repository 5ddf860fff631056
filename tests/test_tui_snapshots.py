"""Snapshots (pytest-textual-snapshot) of each screen at 80x24, on the real default model.

Update after an intended change of the UI: `pytest tests/test_tui_snapshots.py --snapshot-update`,
then look at the SVGs in tests/__snapshots__/test_tui_snapshots/.
"""

from __future__ import annotations

import time

import pytest
from tui_pilot import SIZE, draft, make_app, persona_profile, ready, wait_for

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(autouse=True)
def _utc(monkeypatch):
    """History shows local times: pin the zone so the snapshots do not depend on the machine's."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()

ASK = "hi ro, the jib tore along the leech again. can you fix it by friday?"
MSG = [{"role": "user", "content": "Write a reply to this email:\n\nIs the jib ready?"}]


def seed(store) -> None:
    """Fixed history (fixed times) so the History and Chat screens look the same on every run."""
    d = store.add_draft(prompt="Is the jib ready?", task="email-reply", mode="cope", messages=MSG,
                        generated="aye, the jib is patched and ready.", created="2026-03-01T09:00:00+00:00")
    store.save_draft(d, "aye, the jib is patched and ready for the weekend.\n\nfair winds, —ro")
    store.add_draft(prompt="Quote for a new mainsail cover?", task="email-reply", mode="base", messages=MSG,
                    generated="Thank you for reaching out. A new cover costs", created="2026-03-01T10:30:00+00:00")
    c = store.new_conversation("knots for beginners", created="2026-03-02T09:00:00+00:00")
    store.add_message(c, "user", "which knots should a beginner learn first?", created="2026-03-02T09:00:00+00:00")
    store.add_message(c, "assistant", "start with the bowline, the clove hitch and the reef knot.",
                      created="2026-03-02T09:00:05+00:00")
    store.add_message(c, "user", "and for tying up to a jib sheet?", created="2026-03-02T09:01:00+00:00")
    store.add_message(c, "assistant", "a bowline holds well and unties easily after a load.",
                      created="2026-03-02T09:01:04+00:00")


# What the split view shows once the real model has drafted. A greedy Q4_1 draft is not the
# same text on every CPU (llama.cpp's AVX-512 and AVX2 kernels round differently), so the test
# checks that both panes were drafted, then pins their text: the snapshot is of the layout.
PINNED_PANES = {"out": ("hey ro, the jib is patched and ready", "user · 8 tokens · token limit"),
                "out-base": ("Hi ro,\n\nThank you for letting me know", "base · 8 tokens · token limit")}


def test_draft_screen_split_view(snap_compare):
    persona_profile("ro")

    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("ctrl+b")
        await draft(pilot, ASK)
        for pane, (text, subtitle) in PINNED_PANES.items():
            area = pilot.app.screen.query_one(f"#{pane}")
            assert area.text.strip(), f"the {pane} pane got no draft"
            assert area.border_subtitle.split(" · ")[0] == subtitle.split(" · ")[0]  # the mode each pane ran
            area.load_text(text)
            area.border_subtitle = subtitle
        await pilot.pause(0.05)

    assert snap_compare(make_app(profile="ro"), terminal_size=SIZE, run_before=run_before)


def test_chat_screen(snap_compare):
    persona_profile("ro")
    app = make_app(profile="ro")
    seed(app.store)

    async def run_before(pilot):
        await app.switch_mode("chat")
        await ready(pilot)
        app.screen.open_conversation(1)
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_history_screen_search(snap_compare):
    app = make_app()
    seed(app.store)

    async def run_before(pilot):
        await app.switch_mode("history")
        await ready(pilot)
        app.screen.query_one("#search").focus()
        await pilot.press(*"jib")
        await wait_for(pilot, lambda: len(app.screen.hits) == 2, what="the search")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_history_screen_light_theme(snap_compare):
    app = make_app(theme="light")
    seed(app.store)

    async def run_before(pilot):
        await app.switch_mode("history")
        await ready(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_profiles_screen(snap_compare):
    persona_profile("ro")
    app = make_app(profile="ro")

    async def run_before(pilot):
        await app.switch_mode("profiles")
        await ready(pilot)
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
