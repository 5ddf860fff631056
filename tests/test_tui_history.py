"""The History screen: full-text search over drafts and chats; Enter opens one where it was made."""

from __future__ import annotations

import pytest
from tui_pilot import SIZE, make_app, sync

from tui.chat import Bubble

pytestmark = pytest.mark.usefixtures("no_network")

MSG = [{"role": "user", "content": "Write a reply to this email:\n\nIs the jib ready?"}]


def seed(store) -> tuple[int, int]:
    d = store.add_draft(prompt="Is the jib ready?", task="email-reply", mode="cope", messages=MSG,
                        generated="aye, the jib is patched and ready.", created="2026-03-01T09:00:00+00:00")
    store.save_draft(d, "aye, the jib is patched and ready. fair winds, —ro")
    c = store.new_conversation("knots for beginners", created="2026-03-02T09:00:00+00:00")
    store.add_message(c, "user", "which knots should a beginner learn?", created="2026-03-02T09:00:00+00:00")
    store.add_message(c, "assistant", "the bowline and the clove hitch.", created="2026-03-02T09:00:05+00:00")
    return d, c


@sync
async def test_search_finds_drafts_and_chats_and_enter_opens_them():
    app = make_app()
    d, c = seed(app.ui)
    async with app.run_test(size=SIZE) as pilot:
        await app.switch_mode("history")
        screen = app.screen
        assert [(h.kind, h.id) for h in screen.hits] == [("chat", c), ("draft", d)]  # newest first
        screen.query_one("#search").focus()
        await pilot.press(*"bowl")
        await pilot.pause(0.05)
        assert [(h.kind, h.id) for h in screen.hits] == [("chat", c)]
        await pilot.press("enter", "enter")  # to the table, then open
        await pilot.pause(0.1)
        assert app.current_mode == "chat"
        assert app.screen.conv_id == c and len(app.screen.query(Bubble)) == 2
        await pilot.press("f3")
        screen.query_one("#search").value = "fair winds"
        await pilot.pause(0.05)
        assert [(h.kind, h.id) for h in screen.hits] == [("draft", d)]
        assert "jib is patched" in str(screen.query_one("#preview").render())
        screen.query_one("#hits").focus()
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert app.current_mode == "draft"
        draft = app.screen
        assert draft.query_one("#prompt").text == "Is the jib ready?"
        assert draft.query_one("#out").text.endswith("fair winds, —ro")
        assert draft.draft_id == d and draft.generated == "aye, the jib is patched and ready."
        screen.query_one("#search").value = "nothing-like-this"
        await pilot.pause(0.05)
        assert screen.hits == []
