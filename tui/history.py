"""History: past drafts and chats of the active profile, searchable (SQLite FTS5), newest first.

Enter opens a draft on the Draft screen (to edit and save again) or a chat on the Chat screen.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from cope_local.store import Hit
from tui.widgets import NavBar, StatusLine, steady

if TYPE_CHECKING:
    from tui.app import CopeApp


def local_time(iso: str) -> str:
    """Stored UTC ISO time -> 'MM-DD HH:MM' in the user's time zone."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%m-%d %H:%M")
    except ValueError:
        return iso[:16]


def highlighted(snippet: str) -> Text:
    """FTS snippets mark matches with \\x02 ... \\x03; show them bold."""
    out = Text()
    bold = False
    for part in snippet.replace("\x03", "\x02").split("\x02"):
        out.append(part, style="bold reverse" if bold else "")
        bold = not bold
    return out


class HistoryScreen(Screen):
    BINDINGS = [
        Binding("slash", "focus_search", "Search"),
        Binding("enter", "open", "Open", show=True),
    ]

    app: CopeApp

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[Hit] = []

    def compose(self) -> ComposeResult:
        yield NavBar(id="nav")
        yield steady(Input(placeholder="search drafts and chats (words, prefixes)", compact=True, id="search"))
        table = DataTable(id="hits", cursor_type="row", zebra_stripes=True)
        table.add_column("when", width=11)
        table.add_column("kind", width=5)
        table.add_column("prompt / title", width=24)
        table.add_column("text", width=28)
        yield table
        yield Static(id="preview", markup=False)
        yield StatusLine(id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.watch(self.app, "model_status", self._show_nav)
        self.watch(self.app, "profile_name", lambda _n: self.refresh_hits(), init=False)
        self.refresh_hits()

    def on_screen_resume(self) -> None:
        self._show_nav()
        self.refresh_hits()

    def _show_nav(self, *_args) -> None:
        self.query_one(NavBar).show("history", self.app.model_status)

    @on(Input.Changed, "#search")
    def _search(self, event: Input.Changed) -> None:
        self.refresh_hits()

    @on(Input.Submitted, "#search")
    def _to_table(self, event: Input.Submitted) -> None:
        self.query_one("#hits").focus()

    def refresh_hits(self) -> None:
        query = self.query_one("#search", Input).value
        self.hits = self.app.store.search(query)
        table = self.query_one("#hits", DataTable)
        table.clear()
        for h in self.hits:
            table.add_row(local_time(h.created), h.kind, Text(h.title, no_wrap=True, overflow="ellipsis"),
                          highlighted(h.snippet), key=f"{h.kind}:{h.id}")
        where = f"profile {self.app.profile_name}" if self.app.profile_name else "no profile"
        found = f"{len(self.hits)} match{'es' if len(self.hits) != 1 else ''}" if query.strip() else \
            f"{len(self.hits)} recent"
        fts = "" if self.app.store.has_fts else " (no FTS5 in this sqlite: plain matching)"
        self.query_one(StatusLine).update(f"{found} · {where}{fts} · Enter opens, / searches")
        self._preview()

    @on(DataTable.RowHighlighted, "#hits")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._preview()

    def _current(self) -> Hit | None:
        table = self.query_one("#hits", DataTable)
        if not self.hits or table.cursor_row is None or not 0 <= table.cursor_row < len(self.hits):
            return None
        return self.hits[table.cursor_row]

    def _preview(self) -> None:
        hit = self._current()
        preview = self.query_one("#preview", Static)
        if hit is None:
            preview.update("nothing here yet: drafts and chats appear as you make them")
            return
        store = self.app.store
        if hit.kind == "draft":
            d = store.get_draft(hit.id)
            saved = "saved" if d["saved"] else "not saved"
            text = f"draft #{d['id']} · {d['task']} · {d['mode']} · {saved}\n{d['final'] or d['generated']}"
        else:
            c = store.conversation(hit.id)
            text = f"chat #{c['id']} · {len(c['messages'])} messages\n" + "\n".join(
                f"{m['role']}: {' '.join(m['content'].split())}" for m in c["messages"][-4:])
        preview.update(text)

    def action_focus_search(self) -> None:
        self.query_one("#search").focus()

    @on(DataTable.RowSelected, "#hits")
    async def _selected(self, event: DataTable.RowSelected) -> None:
        await self.action_open()

    async def action_open(self) -> None:
        hit = self._current()
        if hit is None:
            return
        await self.app.switch_mode("draft" if hit.kind == "draft" else "chat")  # mounted before it is used
        if hit.kind == "draft":
            self.app.screen.open_draft(hit.id)
        else:
            self.app.screen.open_conversation(hit.id)
