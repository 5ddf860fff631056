"""Chat: multi-turn with the personal model; every conversation is kept and can be reopened.

Turns are stored as they complete (a reply cut short with Esc is kept as far as it got);
the oldest turns are left out of the prompt when a long chat outgrows the context.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Label, ListItem, ListView, Static

from cope_local.decode import GenConfig
from cope_local.errors import CopeError
from tui.engine import Result
from tui.widgets import NavBar, PromptArea, StatusLine

if TYPE_CHECKING:
    from tui.app import CopeApp

CHAT_MAX_TOKENS = 256  # a reply at most (the app's --max-tokens overrides)
CHAT_ALPHA = 0.3  # α when none is set on the Draft screen


class ChatPiece(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ChatDone(Message):
    def __init__(self, result: Result | None, error: str | None = None) -> None:
        super().__init__()
        self.result, self.error = result, error


class Bubble(Static):
    """One turn; markup off, since the text is the user's or the model's."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(text, markup=False, classes=f"bubble {role}")
        self.role = role
        self.text = text
        self.border_title = "you" if role == "user" else "model"

    def append(self, piece: str) -> None:
        self.text += piece
        self.update(self.text)


class ConversationItem(ListItem):
    def __init__(self, conv_id: int | None, title: str) -> None:
        super().__init__(Label(title, markup=False))
        self.conv_id = conv_id


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "copy", "Copy reply"),
    ]

    app: CopeApp

    def __init__(self) -> None:
        super().__init__()
        self.conv_id: int | None = None
        self.busy = False
        self.stop_event = threading.Event()
        self.reply: Bubble | None = None
        self._restoring = False

    def compose(self) -> ComposeResult:
        yield NavBar(id="nav")
        with Horizontal(id="chat-body"):
            yield ListView(id="convs")
            with Vertical(id="chat-main"):
                yield VerticalScroll(id="log")
                prompt = PromptArea(id="chat-input")
                prompt.border_title = "Message · Enter sends · Shift+Enter/Ctrl+J new line"
                yield prompt
        yield StatusLine(id="status")
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        self.watch(self.app, "model_status", self._show_nav)
        self.watch(self.app, "profile_name", self._profile_changed, init=False)
        self._restoring = True
        area = self.query_one("#chat-input", PromptArea)
        area.load_text(self.app.ui.restore("chat.input", ""))
        area.move_cursor(area.document.end)
        self._restoring = False
        await self.refresh_list()
        self._hint()
        self.query_one("#chat-input").focus()
        self.status("a new chat; earlier ones are on the left (Tab, arrows, Enter opens)")

    def _hint(self) -> None:
        voice = f"profile {self.app.profile_name}" if self.app.profile_name else "the base model (no profile)"
        self.query_one("#log", VerticalScroll).mount(Static(
            f"Chat with {voice}. Type below; Enter sends, Shift+Enter or Ctrl+J adds a line, Esc stops a reply. "
            "Chats are kept: reopen them from the list or search them on F3.", classes="hint", markup=False))

    def on_screen_resume(self) -> None:
        self._show_nav()

    def _show_nav(self, *_args) -> None:
        self.query_one(NavBar).show("chat", self.app.model_status)
        self.refresh_bindings()

    def status(self, text: str) -> None:
        self.query_one(StatusLine).update(text)

    def _profile_changed(self, _name) -> None:
        self.action_new_chat()
        self.call_later(self.refresh_list)

    async def refresh_list(self) -> None:
        """Rebuild the list of chats (awaited, so the highlight lands on the new items)."""
        lv = self.query_one("#convs", ListView)
        await lv.clear()
        convs = self.app.store.conversations()
        await lv.extend([ConversationItem(None, "+ new chat")] + [ConversationItem(c["id"], c["title"]) for c in convs])
        ids = [None] + [c["id"] for c in convs]
        lv.index = ids.index(self.conv_id) if self.conv_id in ids else 0

    @on(PromptArea.Changed, "#chat-input")
    def _autosave(self, event) -> None:
        if not self._restoring:
            self.app.ui.autosave("chat.input", event.text_area.text)

    @on(ListView.Selected, "#convs")
    def _open_selected(self, event: ListView.Selected) -> None:
        item = event.item
        if isinstance(item, ConversationItem):
            if item.conv_id is None:
                self.action_new_chat()
            else:
                self.open_conversation(item.conv_id)
            self.query_one("#chat-input").focus()

    def open_conversation(self, conv_id: int) -> None:
        if self.busy:
            self.status("wait for the reply to finish (or Esc)")
            return
        conv = self.app.store.conversation(conv_id)
        self.conv_id = conv_id
        log = self.query_one("#log", VerticalScroll)
        log.remove_children()
        log.mount_all([Bubble(m["role"], m["content"]) for m in conv["messages"]])
        log.scroll_end(animate=False)
        self.status(f"chat #{conv_id}: {len(conv['messages'])} messages · Enter continues it")

    def action_new_chat(self) -> None:
        if self.busy:
            self.status("wait for the reply to finish (or Esc)")
            return
        self.conv_id = None
        self.query_one("#log", VerticalScroll).remove_children()
        self._hint()
        self.status("a new chat")

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return self.busy
        return True

    @on(PromptArea.Submitted, "#chat-input")
    def send(self, event: PromptArea.Submitted | None = None) -> None:
        if self.busy:
            self.status("a reply is streaming; Esc stops it")
            return
        area = self.query_one("#chat-input", PromptArea)
        text = area.text.strip()
        if not text:
            return
        store = self.app.store
        if self.conv_id is None:
            mode = None if self.app.mode == "auto" else self.app.mode
            self.conv_id = store.new_conversation(text, mode=mode, alpha=self.app.alpha)
            self.call_later(self.refresh_list)
        store.add_message(self.conv_id, "user", text)
        area.load_text("")
        log = self.query_one("#log", VerticalScroll)
        log.query(".hint").remove()
        self.reply = Bubble("assistant")
        log.mount(Bubble("user", text))
        log.mount(self.reply)
        log.scroll_end(animate=False)
        messages = [{"role": m["role"], "content": m["content"]} for m in store.conversation(self.conv_id)["messages"]]
        self.stop_event = threading.Event()
        self.busy = True
        self.refresh_bindings()
        self.status("replying · Esc stops")
        self.run_worker(lambda: self._chat_worker(messages, self.stop_event), thread=True, exclusive=True,
                        group="chat", name="chat")

    def _chat_worker(self, messages: list[dict], stop: threading.Event) -> None:
        app = self.app
        try:
            app.ensure_loaded()
            mode = None if app.mode == "auto" else app.mode
            if mode in ("cope", "user") and not app.engine.has_adapter:
                mode = "base"
            cfg = GenConfig(mode=mode, alpha=CHAT_ALPHA if app.alpha is None else app.alpha,
                            max_tokens=app.max_tokens or CHAT_MAX_TOKENS)
            result = app.engine.stream(messages, cfg, stop, lambda piece: self.post_message(ChatPiece(piece)))
        except CopeError as exc:
            self.post_message(ChatDone(None, str(exc)))
            return
        self.post_message(ChatDone(result))

    def on_chat_piece(self, message: ChatPiece) -> None:
        if self.reply is not None:
            self.reply.append(message.text)
            self.query_one("#log", VerticalScroll).scroll_end(animate=False)

    def on_chat_done(self, message: ChatDone) -> None:
        self.busy = False
        self.refresh_bindings()
        if message.error:
            self.status(f"error: {message.error}")
            return
        r = message.result
        if self.reply is not None and self.conv_id is not None and r is not None:
            self.reply.border_subtitle = r.summary()
            if r.text.strip():
                self.app.store.add_message(self.conv_id, "assistant", r.text)
            self.call_later(self.refresh_list)  # this chat moves to the top
        self.status(f"chat #{self.conv_id} · Enter continues it, Ctrl+N starts a new one")

    def action_stop(self) -> None:
        if self.busy:
            self.stop_event.set()
            self.status("stopping…")

    def action_copy(self) -> None:
        bubbles = [b for b in self.query(Bubble) if b.role == "assistant" and b.text.strip()]
        if not bubbles:
            self.status("no reply to copy yet")
            return
        path = self.app.copy_text(bubbles[-1].text)
        self.status(f"copied the last reply (OSC 52; also in {path})")
