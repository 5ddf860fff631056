"""The cope-local TUI: Draft, Chat, History and Profiles screens over one decoder and one store.

The app owns what the screens share: the active profile, its store (cope_local.store), the
decoder (tui.engine, loaded in a thread worker), and the settings the user last chose, which
are kept in the profile-less store in home() so a restart comes back to the same place.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive

from cope_local import profile as profiles
from cope_local.errors import CopeError
from cope_local.paths import atomic_write_text, home
from cope_local.store import Store, open_store
from cope_local.tasks import DEFAULT_TASK, get_task
from tui.chat import ChatScreen
from tui.draft import DraftScreen
from tui.engine import Engine, Sources
from tui.history import HistoryScreen
from tui.profiles import ProfilesScreen

THEMES = {"dark": "textual-dark", "light": "textual-light"}
COPY_FILE = "clipboard.txt"  # home()/clipboard.txt: the copy fallback where OSC 52 does not reach a clipboard


class CopeApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "cope-local"
    ENABLE_COMMAND_PALETTE = False  # keys are in the footer; F1-F4 in the top bar

    BINDINGS = [
        Binding("f1", "switch_mode('draft')", "Draft", show=False),
        Binding("f2", "switch_mode('chat')", "Chat", show=False),
        Binding("f3", "switch_mode('history')", "History", show=False),
        Binding("f4", "switch_mode('profiles')", "Profiles", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    MODES = {"draft": DraftScreen, "chat": ChatScreen, "history": HistoryScreen, "profiles": ProfilesScreen}

    model_status = reactive("")  # one line: loading / ready / error, shown on every screen
    model_ready = reactive(False)
    profile_name: reactive[str | None] = reactive(None)  # the active profile; None = base model, home() store

    def __init__(self, *, profile: str | None = "", model: str | None = None, task: str | None = None,
                 max_tokens: int | None = None, n_ctx: int = 2048, threads: int | None = None,
                 gpu_layers: int | None = None, theme: str | None = None):
        """profile: a name, None for none, "" for the one used last. max_tokens: None = the task's."""
        super().__init__()
        self.ui = open_store(None)  # settings and autosaved input boxes
        self.model = model
        self.max_tokens = max_tokens
        self.engine = Engine(n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers)
        self.task_name = get_task(task or self.ui.restore("ui.task") or DEFAULT_TASK).name
        self.mode = self.ui.restore("ui.mode", "auto")  # auto | cope | user | base
        self.alpha: float | None = _float(self.ui.restore("ui.alpha"))  # None: the task's default
        self.split = self.ui.restore("ui.split", "0") == "1"
        self.theme = THEMES.get(theme or self.ui.restore("ui.theme", "dark"), THEMES["dark"])
        if profile == "":
            profile = self.ui.restore("ui.profile") or None
            if profile and profile not in profiles.profile_names():
                profile = None
        elif profile is not None:
            profiles.load_profile(profile)  # a wrong name fails before the UI starts
        self.store: Store = self.ui
        self.set_reactive(CopeApp.profile_name, profile)
        self._open_store(profile)
        self.load_error: str | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.switch_mode("draft")
        self.load_model()

    def on_unmount(self) -> None:
        self.engine.close()
        if self.store is not self.ui:
            self.store.close()
        self.ui.close()

    # ---- profile, store and model -------------------------------------------------------------
    def _open_store(self, name: str | None) -> None:
        if self.store is not self.ui:
            self.store.close()
        self.store = open_store(name) if name else self.ui

    @property
    def generating(self) -> bool:
        """A draft or a chat reply is streaming (switching profiles then would mix stores)."""
        return any(w.group in ("draft", "chat") and w.is_running for w in self.workers)

    def set_profile(self, name: str | None) -> bool:
        """Make `name` (or None: no profile) active: its store, its adapter, its task -> whether it switched."""
        if name == self.profile_name:
            return True
        if self.generating:
            self.notify("a draft or reply is streaming; Esc stops it, then switch profiles", severity="warning")
            return False
        self._open_store(name)
        self.ui.autosave("ui.profile", name or "")
        if name:
            task = profiles.load_profile(name).task
            self.task_name = get_task(task).name
        self.profile_name = name
        self.load_model()
        return True

    def sources(self) -> Sources:
        """What the decoder should be made from for the active profile."""
        self.load_error = None
        if not self.profile_name:
            return Sources(model=self.model)
        try:
            prof = profiles.load_profile(self.profile_name)
            adapter = profiles.active_adapter(prof)
            tam = profiles.active_tam(prof) if adapter else None
        except CopeError as exc:
            self.load_error = str(exc)
            return Sources(model=self.model)
        return Sources(model=self.model or prof.model, adapter=str(adapter) if adapter else None,
                       tam=str(tam) if tam else None)

    def load_model(self) -> None:
        self.model_ready = False
        self.model_status = "loading the model…"
        self.run_worker(self._load_worker, thread=True, exclusive=True, group="load", name="load model")

    def _load_worker(self) -> None:
        sources = self.sources()
        try:
            self.ensure_loaded(sources)
        except CopeError as exc:
            self.call_from_thread(self._loaded, f"model error: {exc}", False)
            return
        note = " · adapter unreadable: see F4" if self.load_error else ""
        who = self.profile_name or "no profile"
        self.call_from_thread(self._loaded, f"{who} · {sources.describe()}{note}", True)

    def ensure_loaded(self, sources: Sources | None = None) -> None:
        """Blocking (call from a worker thread): load the decoder for the active profile if needed."""
        self.engine.load(sources or self.sources())

    def _loaded(self, status: str, ok: bool) -> None:
        self.model_status = status
        self.model_ready = ok
        if not ok:
            self.notify(status, severity="error", timeout=10)

    # ---- settings -----------------------------------------------------------------------------
    def remember(self, key: str, value: str) -> None:
        self.ui.autosave(f"ui.{key}", value)

    def action_toggle_theme(self) -> None:
        self.theme = THEMES["light"] if self.theme == THEMES["dark"] else THEMES["dark"]
        self.remember("theme", "light" if self.theme == THEMES["light"] else "dark")

    # ---- clipboard ----------------------------------------------------------------------------
    def copy_text(self, text: str) -> Path:
        """OSC 52 to the terminal's clipboard, and the same text in home()/clipboard.txt (0600)
        for terminals that ignore OSC 52 (the terminal cannot tell us whether it worked)."""
        self.copy_to_clipboard(text)
        path = home() / COPY_FILE
        atomic_write_text(path, text, mode=0o600)
        return path


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None

