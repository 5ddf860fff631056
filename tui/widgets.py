"""Small widgets shared by the screens: the prompt box, the top bar and the status line."""

from __future__ import annotations

from textual import events
from textual.markup import escape
from textual.message import Message
from textual.widgets import Input, Static, TextArea

SCREENS = (("draft", "F1", "Draft"), ("chat", "F2", "Chat"), ("history", "F3", "History"), ("profiles", "F4", "Profiles"))


class PromptArea(TextArea):
    """A multi-line input where Enter sends and Shift+Enter or Ctrl+J adds a line.

    Many terminals send the same byte for Enter and Shift+Enter; Ctrl+J (a line feed)
    always arrives as itself, so it is the one that works everywhere.
    """

    class Submitted(Message):
        def __init__(self, area: PromptArea, text: str) -> None:
            super().__init__()
            self.area = area
            self.text = text

        @property
        def control(self) -> PromptArea:
            return self.area

    def __init__(self, text: str = "", **kwargs) -> None:
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("tab_behavior", "focus")
        kwargs.setdefault("show_line_numbers", False)
        super().__init__(text, **kwargs)
        self.cursor_blink = False  # steady: calmer, and screenshots come out the same every time

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter" and not self.read_only:
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in ("shift+enter", "ctrl+j") and not self.read_only:
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self.replace("\n", start, end, maintain_selection_offset=False)
            return
        await super()._on_key(event)


class NavBar(Static):
    """One line at the top: the screens (clickable, F1-F4) and what is loaded."""

    def show(self, current: str, right: str = "") -> None:
        parts = []
        for mode, key, label in SCREENS:
            text = f" {key} {label} "
            if mode == current:
                text = f"[reverse bold]{text}[/]"
            parts.append(f"[@click=app.switch_mode('{mode}')]{text}[/]")
        self.update("[b]cope[/b] " + "".join(parts) + (" [dim]│[/] " + escape(right) if right else ""))


class StatusLine(Static):
    """One line above the footer: what the last action did (plain text: it quotes user data)."""

    def __init__(self, text: str = "", **kwargs) -> None:
        kwargs.setdefault("markup", False)
        super().__init__(text, **kwargs)


def output_area(id: str, title: str) -> TextArea:
    """A read-only-while-streaming text box for model output (a steady cursor: no blink, drawn only when focused)."""
    area = TextArea(id=id, read_only=True, soft_wrap=True, tab_behavior="focus")
    area.cursor_blink = False
    area.border_title = title
    return area


def steady(widget: Input) -> Input:
    """An Input without a blinking cursor (calmer, and screenshots come out the same every time)."""
    widget.cursor_blink = False
    return widget
