"""The Chat screen with the real default model: turns stream, are kept, and a chat reopens after a restart."""

from __future__ import annotations

import pytest
from tui_pilot import SIZE, make_app, ready, sync, wait_for

from tui.chat import Bubble

pytestmark = pytest.mark.usefixtures("no_network")


async def send(pilot, text: str) -> None:
    screen = pilot.app.screen
    area = screen.query_one("#chat-input")
    area.focus()
    area.load_text(text)
    n = len(screen.query(Bubble))
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(screen.query(Bubble)) == n + 2 and not screen.busy, what="the reply")
    await pilot.pause(0.05)


@sync
async def test_multi_turn_chat_is_kept_and_reopened_after_a_restart():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await app.switch_mode("chat")
        await ready(pilot)
        screen = app.screen
        await send(pilot, "Hello! Who are you?")
        await send(pilot, "What can you do?")
        bubbles = list(screen.query(Bubble))
        assert [b.role for b in bubbles] == ["user", "assistant", "user", "assistant"]
        assert all(b.text.strip() for b in bubbles)
        conv = app.store.conversation(screen.conv_id)
        assert [m["content"] for m in conv["messages"]] == [b.text for b in bubbles]
        assert conv["title"] == "Hello! Who are you?"
        first_id = screen.conv_id
        await pilot.press("ctrl+n")  # a new chat, the old one is in the list
        assert screen.conv_id is None and not screen.query(Bubble)
        screen.query_one("#chat-input").load_text("half a thought")
        await pilot.pause(0.05)
    app2 = make_app()
    async with app2.run_test(size=SIZE) as pilot:
        await app2.switch_mode("chat")
        screen = app2.screen
        assert screen.query_one("#chat-input").text == "half a thought"  # autosaved
        items = list(screen.query_one("#convs").children)
        assert [getattr(i, "conv_id", "?") for i in items] == [None, first_id]
        screen.query_one("#convs").focus()
        await pilot.press("down", "enter")
        await pilot.pause(0.05)
        assert screen.conv_id == first_id and len(screen.query(Bubble)) == 4
        await ready(pilot)
        await send(pilot, "Thanks!")  # continues the same conversation, with its history as context
        assert len(app2.store.conversation(first_id)["messages"]) == 6


@sync
async def test_esc_stops_a_reply_and_keeps_what_came():
    app = make_app(max_tokens=300)
    async with app.run_test(size=SIZE) as pilot:
        await app.switch_mode("chat")
        await ready(pilot)
        screen = app.screen
        screen.query_one("#chat-input").focus()
        screen.query_one("#chat-input").load_text("Tell me a long story about the sea.")
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.reply is not None and len(screen.reply.text) >= 3, what="the first pieces")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.busy, timeout=10, what="the stop")
        msgs = app.store.conversation(screen.conv_id)["messages"]
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"] == screen.reply.text
        assert "stopped" in str(screen.reply.border_subtitle)
