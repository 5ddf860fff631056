"""Draft: type what to reply to (or what to write), the draft streams in, edit it, save it.

Saving a draft the user edited keeps (prompt, chosen = edited, rejected = generated) as a
preference pair in the profile's store: real corrections, for `--from-edits` training.
The first draft is greedy (the paper's decoding); Regenerate samples (T 0.7, a new seed each time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Input, Label, Select, TextArea

from cope_local import profile as profiles
from cope_local.decode import GenConfig
from cope_local.errors import CopeError
from cope_local.tasks import get_task, list_tasks
from tui.engine import Result
from tui.history import local_time
from tui.widgets import NavBar, PromptArea, StatusLine, output_area, steady

if TYPE_CHECKING:
    from tui.app import CopeApp

MODES = (("auto", "auto"), ("cope", "cope"), ("user", "user"), ("base", "base"))
REGEN_TEMPERATURE = 0.7  # Regenerate samples: greedy would give the same text again
NO_PROFILE = ""


def profile_options() -> list[tuple[str, str]]:
    return [("(none)", NO_PROFILE)] + [(n, n) for n in profiles.profile_names()]


@dataclass
class Plan:
    pane: str  # widget id of the output
    mode: str | None  # None: cope with an adapter, else base


class Piece(Message):
    def __init__(self, pane: str, text: str) -> None:
        super().__init__()
        self.pane, self.text = pane, text


class Started(Message):
    def __init__(self, pane: str, mode: str) -> None:
        super().__init__()
        self.pane, self.mode = pane, mode


class Finished(Message):
    def __init__(self, pane: str, result: Result | None, error: str | None = None, last: bool = True) -> None:
        super().__init__()
        self.pane, self.result, self.error, self.last = pane, result, error, last


class DraftScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regen"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+o", "copy", "Copy"),
        Binding("ctrl+b", "toggle_split", "Split"),
    ]

    app: CopeApp

    def __init__(self) -> None:
        super().__init__()
        self.busy = False
        self.stop_event = threading.Event()
        self.draft_id: int | None = None  # the stored draft the main pane shows
        self.generated = ""  # what the model wrote there (the rejected side of an edit pair)
        self.regens = 0
        self.last_result: Result | None = None
        self._restoring = False

    # ---- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        app = self.app
        yield NavBar(id="nav")
        with Horizontal(id="controls"):
            yield Label("Profile")
            yield Select(profile_options(), value=app.profile_name or NO_PROFILE, allow_blank=False, compact=True,
                         id="profile")
            yield Label("Task")
            yield Select([(t.name, t.name) for t in list_tasks()], value=app.task_name, allow_blank=False,
                         compact=True, id="task")
            yield Label("Mode")
            yield Select(MODES, value=app.mode if app.mode in dict(MODES) else "auto", allow_blank=False,
                         compact=True, id="mode")
            yield Label("α")
            yield steady(Input("" if app.alpha is None else f"{app.alpha:g}", placeholder=self._alpha_default(),
                               type="number", compact=True, id="alpha"))
            yield Checkbox("Split", app.split, compact=True, id="split")
        prompt = PromptArea(id="prompt")
        prompt.border_title = "Your text · Enter drafts · Shift+Enter/Ctrl+J new line"
        yield prompt
        with Horizontal(id="outputs"):
            yield output_area("out", "Draft")
            yield output_area("out-base", "base model")
        yield StatusLine(id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.watch(self.app, "model_status", self._show_nav)
        self.watch(self.app, "profile_name", self._profile_changed, init=False)
        self._apply_split()
        self._restore()
        self.query_one("#prompt").focus()

    def on_screen_resume(self) -> None:
        self._sync_profiles()
        self._show_nav()

    def _sync_profiles(self) -> None:
        """Profiles may have been created or deleted meanwhile: refresh the list without a Changed event."""
        select = self.query_one("#profile", Select)
        with self.prevent(Select.Changed):
            select.set_options(profile_options())
            select.value = self.app.profile_name or NO_PROFILE

    def _show_nav(self, *_args) -> None:
        self.query_one(NavBar).show("draft", self.app.model_status)
        self.query_one("#out", TextArea).loading = not self.app.model_ready and not self.busy and \
            self.app.model_status.startswith("loading")
        self.refresh_bindings()

    def _alpha_default(self) -> str:
        return f"{get_task(self.app.task_name).default_alpha:g}"

    def status(self, text: str) -> None:
        self.query_one(StatusLine).update(text)

    # ---- autosave: the input box, the draft being edited ---------------------------------------
    def _restore(self) -> None:
        ui = self.app.ui
        self._restoring = True
        try:
            prompt = self.query_one("#prompt", PromptArea)
            prompt.load_text(ui.restore("draft.input", ""))
            prompt.move_cursor(prompt.document.end)
            ref = ui.restore("draft.ref", "")  # "<profile>:<draft id>"
            owner, _, ident = ref.rpartition(":")
            if ident.isdigit() and owner == (self.app.profile_name or ""):
                try:
                    d = self.app.store.get_draft(int(ident))
                except CopeError:
                    return
                self.draft_id, self.generated = d["id"], d["generated"]
                out = self.query_one("#out", TextArea)
                out.load_text(ui.restore("draft.output", d["final"] or d["generated"]))
                out.read_only = False
                self.status(f"restored draft #{self.draft_id}; edit it and Ctrl+S saves it")
        finally:
            self._restoring = False

    @on(TextArea.Changed, "#prompt")
    def _autosave_prompt(self, event: TextArea.Changed) -> None:
        if not self._restoring:
            self.app.ui.autosave("draft.input", event.text_area.text)

    @on(TextArea.Changed, "#out")
    def _autosave_output(self, event: TextArea.Changed) -> None:
        if not self._restoring and not self.busy and self.draft_id is not None:
            self.app.ui.autosave("draft.output", event.text_area.text)

    # ---- controls -----------------------------------------------------------------------------
    def _select_quietly(self, selector: str, value) -> None:
        select = self.query_one(selector, Select)
        if select.value != value:
            with select.prevent(Select.Changed):
                select.value = value

    @on(Select.Changed, "#profile")
    def _profile_selected(self, event: Select.Changed) -> None:
        name = event.value or None
        if name != self.app.profile_name and not self.app.set_profile(name):
            self._sync_profiles()  # refused: show the active one again

    def _profile_changed(self, name: str | None) -> None:
        self._sync_profiles()
        self._select_quietly("#task", self.app.task_name)
        self.query_one("#alpha", Input).placeholder = self._alpha_default()
        self.draft_id, self.generated = None, ""
        self.app.ui.autosave("draft.ref", "")

    @on(Select.Changed, "#task")
    def _task_selected(self, event: Select.Changed) -> None:
        self.app.task_name = str(event.value)
        self.app.remember("task", self.app.task_name)
        self.query_one("#alpha", Input).placeholder = self._alpha_default()

    @on(Select.Changed, "#mode")
    def _mode_selected(self, event: Select.Changed) -> None:
        self.app.mode = str(event.value)
        self.app.remember("mode", self.app.mode)

    @on(Input.Changed, "#alpha")
    def _alpha_changed(self, event: Input.Changed) -> None:
        text = event.value.strip()
        try:
            value = float(text) if text else None
        except ValueError:
            value = None
        if value is not None and not 0.0 <= value <= 5.0:
            self.status("α must be between 0 and 5 (the paper uses 0.1-0.7)")
            return
        self.app.alpha = value
        self.app.remember("alpha", "" if value is None else f"{value:g}")

    @on(Checkbox.Changed, "#split")
    def _split_changed(self, event: Checkbox.Changed) -> None:
        self.app.split = event.value
        self.app.remember("split", "1" if event.value else "0")
        self._apply_split()

    def action_toggle_split(self) -> None:
        self.query_one("#split", Checkbox).toggle()

    def _apply_split(self) -> None:
        self.query_one("#out-base").display = self.app.split

    # ---- drafting -----------------------------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return self.busy  # Esc shows (and works) only while a draft streams
        if action in ("regenerate", "save"):
            return None if self.busy else True  # shown greyed while busy
        return True

    @on(PromptArea.Submitted, "#prompt")
    def _submitted(self, event: PromptArea.Submitted) -> None:
        self.generate()

    def action_regenerate(self) -> None:
        self.regens += 1
        self.generate(temperature=REGEN_TEMPERATURE, seed=self.regens)

    def generate(self, temperature: float = 0.0, seed: int = 0) -> None:
        if self.busy:
            self.status("already drafting; Esc stops it")
            return
        text = self.query_one("#prompt", PromptArea).text
        if not text.strip():
            self.status("type what to reply to, or what to write about, first")
            return
        app = self.app
        task = get_task(app.task_name)
        messages = task.draft_messages(text)
        alpha = task.default_alpha if app.alpha is None else app.alpha
        max_tokens = app.max_tokens or task.max_new_tokens
        mode = None if app.mode == "auto" else app.mode
        plan = [Plan("out", mode)] + ([Plan("out-base", "base")] if app.split else [])
        self.stop_event = threading.Event()
        self.busy = True
        self.draft_id, self.generated, self.last_result = None, "", None
        self.app.ui.autosave("draft.ref", "")
        for p in plan:
            area = self.query_one(f"#{p.pane}", TextArea)
            area.read_only = True
            area.load_text("")
            area.border_subtitle = "drafting…"
        self.query_one("#out", TextArea).loading = False
        how = "greedy" if temperature == 0 else f"sampled T {temperature:g} seed {seed}"
        self.status(f"drafting ({task.name}, α {alpha:g}, {how}) · Esc stops")
        self.refresh_bindings()
        self.run_worker(lambda: self._draft_worker(text, task, messages, plan, alpha, max_tokens, temperature,
                                                   seed, self.stop_event),
                        thread=True, exclusive=True, group="draft", name="draft")

    def _draft_worker(self, text, task, messages, plan, alpha, max_tokens, temperature, seed, stop) -> None:
        """Worker thread: load if needed, then stream each pane in turn (one decoder, one stream at a time)."""
        app = self.app
        try:
            app.ensure_loaded()
        except CopeError as exc:
            self.post_message(Finished(plan[0].pane, None, str(exc)))
            return
        has_adapter = app.engine.has_adapter
        for i, p in enumerate(plan):
            last = i == len(plan) - 1
            mode = p.mode
            if mode in ("cope", "user") and not has_adapter:
                mode = "base"
                self.post_message(Started(p.pane, "base (no adapter: train a profile on F4)"))
            if p.pane == "out-base" and not has_adapter:
                self.post_message(Finished(p.pane, None, "no personal adapter to compare with: choose a trained "
                                                         "profile (F4)", last))
                return
            cfg = GenConfig(mode=mode, sft_mode=task.sft_mode, alpha=alpha, tau=task.default_tau, max_tokens=max_tokens,
                            temperature=temperature, seed=seed)
            try:
                result = app.engine.stream(messages, cfg, stop, lambda piece, pane=p.pane: self.post_message(
                    Piece(pane, piece)))
            except CopeError as exc:
                self.post_message(Finished(p.pane, None, str(exc), True))
                return
            self.post_message(Finished(p.pane, result, None, last or result.stop_reason == "stopped"))
            if result.stop_reason == "stopped":
                return

    def on_piece(self, message: Piece) -> None:
        area = self.query_one(f"#{message.pane}", TextArea)
        area.insert(message.text, area.document.end)
        area.scroll_end(animate=False)

    def on_started(self, message: Started) -> None:
        self.query_one(f"#{message.pane}", TextArea).border_subtitle = message.mode

    def on_finished(self, message: Finished) -> None:
        area = self.query_one(f"#{message.pane}", TextArea)
        if message.error:
            self.status(f"error: {message.error}")
        elif message.result is not None:
            r = message.result
            area.border_subtitle = r.summary()
            if message.pane == "out":
                self._keep(r)
        if message.last:
            self.busy = False
            self.query_one("#out", TextArea).read_only = self.draft_id is None
            self.refresh_bindings()
            if self.draft_id is not None and not message.error:
                stopped = " (stopped)" if self.last_result and self.last_result.stop_reason == "stopped" else ""
                self.status(f"draft #{self.draft_id}{stopped} · edit it and Ctrl+S saves (your edit teaches the "
                            f"profile) · Ctrl+R regenerates")

    def _keep(self, r: Result) -> None:
        """Every finished (or stopped) draft goes to history; Save later adds the user's final text."""
        app = self.app
        text = self.query_one("#prompt", PromptArea).text
        task = get_task(app.task_name)
        self.last_result = r
        self.generated = r.text
        src = app.engine.sources
        self.draft_id = app.store.add_draft(prompt=text, task=task.name, mode=r.mode, messages=task.draft_messages(text),
                                            generated=r.text, alpha=app.alpha if app.alpha is not None else
                                            task.default_alpha, stop_reason=r.stop_reason,
                                            model=src.model if src else None, adapter=src.adapter if src else None)
        app.ui.autosave("draft.ref", f"{app.profile_name or ''}:{self.draft_id}")
        app.ui.autosave("draft.output", r.text)

    def action_stop(self) -> None:
        if self.busy:
            self.stop_event.set()
            self.status("stopping…")

    def action_save(self) -> None:
        if self.busy:
            self.status("wait for the draft to finish (or Esc) before saving")
            return
        if self.draft_id is None:
            self.status("nothing to save yet: Enter drafts")
            return
        final = self.query_one("#out", TextArea).text
        pair = self.app.store.save_draft(self.draft_id, final)
        if pair is not None:
            n = self.app.store.count_pairs()
            self.status(f"saved draft #{self.draft_id}; your edit is kept as preference pair #{pair} "
                        f"({n} in this profile)")
        else:
            self.status(f"saved draft #{self.draft_id} (unedited: no preference pair)")

    def action_copy(self) -> None:
        text = self.query_one("#out", TextArea).text
        if not text.strip():
            self.status("nothing to copy yet")
            return
        path = self.app.copy_text(text)
        self.status(f"copied (OSC 52 to your terminal's clipboard; also in {path})")

    def open_draft(self, draft_id: int) -> None:
        """Show a stored draft (from History): its prompt, and its saved text or generated text to edit."""
        if self.busy:
            self.status("a draft is streaming; Esc stops it, then open that one again")
            return
        d = self.app.store.get_draft(draft_id)
        self._restoring = True
        try:
            self.query_one("#prompt", PromptArea).load_text(d["prompt"])
            out = self.query_one("#out", TextArea)
            out.load_text(d["final"] or d["generated"])
            out.read_only = False
            out.border_subtitle = f"#{d['id']} · {d['mode']} · {local_time(d['created'])}"
        finally:
            self._restoring = False
        self.draft_id, self.generated = d["id"], d["generated"]
        self._select_quietly("#task", get_task(d["task"]).name)
        self.app.task_name = get_task(d["task"]).name
        self.app.ui.autosave("draft.input", d["prompt"])
        self.app.ui.autosave("draft.ref", f"{self.app.profile_name or ''}:{d['id']}")
        self.app.ui.autosave("draft.output", out.text)
        self.status(f"opened draft #{d['id']} from history; edit it and Ctrl+S saves")
