"""Profiles: create one from your writing (kept/skipped shown), train it, pick the adapter drafts use.

Training runs `cope profile train NAME` in a child process (tui.training): a bar per stage
with loss and ETA; Cancel interrupts it like Ctrl-C and Train resumes. Creating a profile
ingests in a worker thread, first as a dry run ("Check") that shows what would be kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, ListItem, ListView, ProgressBar, Select, Static

from cope_local import profile as profiles
from cope_local.errors import CopeError
from cope_local.store import export_edit_pairs
from cope_local.tasks import DEFAULT_TASK, list_tasks
from cope_local.train.edits import MIN_EDIT_PAIRS
from tui.training import STAGES, Progress, TrainRun, run_training
from tui.widgets import NavBar, StatusLine, steady

if TYPE_CHECKING:
    from tui.app import CopeApp

FROM_EDITS_NOTE = (f"learn from your edits (`cope profile train NAME --from-edits`): DPO on your saved edits over "
                   f"the drafts they replaced; needs a trained profile and {MIN_EDIT_PAIRS} edits")


def report_text(n_items: int, report) -> str:
    """Kept and skipped counts, and why, from an IngestReport (its own summary lines)."""
    lines = report.lines()
    return "\n".join(lines) if lines else f"kept {n_items}"


class ProfileItem(ListItem):
    def __init__(self, name: str | None) -> None:
        super().__init__(Label(name or "(none: base model)", markup=False))
        self.profile = name


class StageRow(Horizontal):
    def __init__(self, stage: str) -> None:
        super().__init__(classes="stage-row")
        self.stage = stage

    def compose(self) -> ComposeResult:
        yield Label(self.stage, classes="stage-name")
        yield ProgressBar(total=1.0, show_eta=False, show_percentage=True, classes="stage-bar")
        yield Label("", classes="stage-detail", markup=False)

    def set(self, p: Progress) -> None:
        bar = self.query_one(ProgressBar)
        if p.state == "off":
            bar.update(total=1.0, progress=0)
        elif p.fraction is not None:
            bar.update(total=1.0, progress=p.fraction)
        parts = [x for x in (p.state if p.state != "running" else "", f"loss {p.loss:.3f}" if p.loss is not None else "",
                             f"ETA {p.eta}" if p.eta else "") if x]
        self.query_one(".stage-detail", Label).update(" · ".join(parts) or p.text[len(p.stage) + 1:].strip()[:40])

    def reset(self) -> None:
        self.query_one(ProgressBar).update(total=1.0, progress=0)
        self.query_one(".stage-detail", Label).update("")


class CreateProfile(ModalScreen[str | None]):
    """Name, paths and task; Check ingests without writing, Create writes the profile."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="create"):
            yield Label("New profile from your writing", classes="title")
            yield steady(Input(placeholder="name (letters, digits, . _ -)", compact=True, id="new-name"))
            yield steady(Input(placeholder="paths: Sent mailbox, folders of .txt/.md, JSONL (space-separated)",
                               compact=True, id="new-paths"))
            yield steady(Input(placeholder="your email address(es), optional", compact=True, id="new-me"))
            yield Select([(t.name, t.name) for t in list_tasks()], value=DEFAULT_TASK, allow_blank=False, compact=True,
                         id="new-task")
            with Horizontal(classes="buttons"):
                yield Button("Check", id="check", compact=True)
                yield Button("Create", id="create-btn", variant="primary", compact=True)
                yield Button("Close", id="close", compact=True)
            with VerticalScroll(id="create-report-box"):
                yield Static("Check shows how many texts would be kept and what was skipped, and why.",
                             id="create-report", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#check")
    def _check(self) -> None:
        self._ingest(dry_run=True)

    @on(Button.Pressed, "#create-btn")
    def _create(self) -> None:
        self._ingest(dry_run=False)

    def _ingest(self, dry_run: bool) -> None:
        name = self.query_one("#new-name", Input).value.strip()
        paths = self.query_one("#new-paths", Input).value.split()
        me = [x.strip(",; ") for x in self.query_one("#new-me", Input).value.split() if x.strip(",; ")]
        task = str(self.query_one("#new-task", Select).value)
        if not name or not paths:
            self._report("give a name and at least one path")
            return
        self._report("reading…")
        self.query_one("#create-btn", Button).disabled = True
        self._ingest_worker(name, paths, me, task, dry_run)

    @work(thread=True, exclusive=True, group="ingest")
    def _ingest_worker(self, name: str, paths: list[str], me: list[str], task: str, dry_run: bool) -> None:
        try:
            _prof, items, report = profiles.create_profile(name, paths, task=task, me=me, dry_run=dry_run)
        except CopeError as exc:
            self.app.call_from_thread(self._done, f"error: {exc}", None)
            return
        head = f"{'would keep' if dry_run else 'created profile ' + name + ': kept'} {len(items)} texts"
        if dry_run and len(items) < profiles.MIN_ITEMS:
            head += f" (too few: at least {profiles.MIN_ITEMS} are needed)"
        self.app.call_from_thread(self._done, head + "\n" + report_text(len(items), report), None if dry_run else name)

    def _done(self, text: str, created: str | None) -> None:
        self._report(text)
        self.query_one("#create-btn", Button).disabled = False
        if created:
            self.query_one("#close", Button).label = "Done"
            self.created = created

    @on(Button.Pressed, "#close")
    def _finish(self) -> None:
        self.dismiss(getattr(self, "created", None))

    def _report(self, text: str) -> None:
        self.query_one("#create-report", Static).update(text)


class ProfilesScreen(Screen):
    BINDINGS = [
        Binding("n", "new", "New"),
        Binding("u", "use", "Use"),
        Binding("t", "train", "Train"),
        Binding("d", "train_dpo", "+DPO"),
        Binding("x", "cancel", "Cancel"),
        Binding("a", "activate", "Activate"),
        Binding("e", "from_edits", "From edits"),
    ]

    app: CopeApp

    def __init__(self) -> None:
        super().__init__()
        self.training: TrainRun | None = None
        self.train_kind = "all"  # what the running (or last) training does: all | stages | edits
        self.training_profile: str | None = None

    def compose(self) -> ComposeResult:
        yield NavBar(id="nav")
        with Horizontal(id="prof-body"):
            yield ListView(id="prof-list")
            with Vertical(id="prof-main"):
                yield Static(id="prof-info", markup=False)
                with Horizontal(classes="row"):
                    yield Label("Adapter ")
                    yield Select([], prompt="(none trained)", compact=True, id="adapters")
                    yield Button("Activate", id="activate", compact=True)
                with Horizontal(classes="row buttons"):
                    yield Button("Use", id="use", variant="primary", compact=True)
                    yield Button("Train", id="train", compact=True)
                    yield Button("+DPO", id="train-dpo", compact=True)
                    yield Button("Cancel", id="cancel", compact=True, disabled=True)
                    yield Button("From edits", id="from-edits", compact=True, disabled=True)
                    yield Button("New…", id="new", compact=True)
                with Vertical(id="stages"):
                    for stage in STAGES:
                        yield StageRow(stage)
        yield StatusLine(id="status")
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        self.watch(self.app, "model_status", self._show_nav)
        await self.refresh_list(self.app.profile_name)
        self.query_one("#from-edits", Button).tooltip = FROM_EDITS_NOTE
        self.query_one("#prof-list").focus()

    async def on_screen_resume(self) -> None:
        self._show_nav()
        await self.refresh_list()

    def _show_nav(self, *_args) -> None:
        self.query_one(NavBar).show("profiles", self.app.model_status)

    def status(self, text: str) -> None:
        self.query_one(StatusLine).update(text)

    # ---- list and details ---------------------------------------------------------------------
    async def refresh_list(self, select: str | None = "") -> None:
        """Rebuild the list (awaited, so the highlight lands on the new items); keep or move the highlight."""
        lv = self.query_one("#prof-list", ListView)
        current = self.selected() if select == "" else select
        names = [None] + profiles.profile_names()
        await lv.clear()
        await lv.extend([ProfileItem(n) for n in names])
        want = current if current in names else self.app.profile_name
        lv.index = names.index(want) if want in names else 0
        self.show_info()

    def selected(self) -> str | None:
        lv = self.query_one("#prof-list", ListView)
        item = lv.highlighted_child
        return item.profile if isinstance(item, ProfileItem) else None

    @on(ListView.Highlighted, "#prof-list")
    def _highlighted(self, _event) -> None:
        self.show_info()

    @on(ListView.Selected, "#prof-list")
    def _chosen(self, _event) -> None:
        self.action_use()

    def show_info(self) -> None:
        name = self.selected()
        info = self.query_one("#prof-info", Static)
        adapters = self.query_one("#adapters", Select)
        active_mark = " (in use)" if name == self.app.profile_name else ""
        for b in ("#train", "#train-dpo", "#activate"):
            self.query_one(b, Button).disabled = name is None or self.training is not None
        if name is None:
            info.update(f"No profile{active_mark}: drafts come from the base model alone; drafts, chats and edits "
                        "are kept in the cope-local data folder.\n\nCreate a profile from your writing (n), train it "
                        "(t), then use it (u).")
            adapters.set_options([])
            self._from_edits(len(export_edit_pairs(None)), trained=False)
            return
        try:
            d = profiles.describe(name)
        except CopeError as exc:
            info.update(f"{name}: {exc}")
            return
        ingest = d.get("ingest") or {}
        skipped = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in (ingest.get("skipped") or {}).items()) or "none"
        active = d["active_adapter"].rsplit("/", 1)[-1] if d["active_adapter"] else "none yet (train it: t)"
        pairs = len(export_edit_pairs(name))
        lines = [f"{name}{active_mark} · task {d['task']} · {d['items']} texts · {pairs} edit pairs",
                 f"ingest: kept {ingest.get('kept', d['items'])}, skipped {skipped}",
                 f"sources: {', '.join(s.rsplit('/', 1)[-1] for s in d['sources']) or '-'}",
                 f"active adapter: {active}",
                 f"stages run: {', '.join(s for s in STAGES if s + '.json' in d['stages']) or '-'}"]
        if d.get("active_error"):
            lines.append(d["active_error"])
        if pairs:
            lines.append("From edits (e) learns from them" if pairs >= MIN_EDIT_PAIRS and d["active_adapter"]
                         else f"(From edits needs a trained profile and {MIN_EDIT_PAIRS} edit pairs)")
        info.update("\n".join(lines))
        adapters.set_options([(a, a) for a in reversed(d["adapters"])])
        if d["active_adapter"]:
            cur = d["active_adapter"].rsplit("/", 1)[-1]
            if cur in d["adapters"]:
                adapters.value = cur
        self._from_edits(pairs, trained=bool(d["active_adapter"]))

    def _from_edits(self, n_pairs: int, trained: bool) -> None:
        btn = self.query_one("#from-edits", Button)
        btn.label = f"From edits ({n_pairs})"
        btn.disabled = not trained or n_pairs < MIN_EDIT_PAIRS or self.training is not None

    # ---- actions ------------------------------------------------------------------------------
    def action_new(self) -> None:
        def created(name: str | None) -> None:
            if name:
                self.call_later(self.refresh_list, name)
                self.status(f"created {name}; Train (t) makes its adapter, Use (u) drafts with it")

        self.app.push_screen(CreateProfile(), created)

    @on(Button.Pressed, "#new")
    def _new(self) -> None:
        self.action_new()

    def action_use(self) -> None:
        name = self.selected()
        if not self.app.set_profile(name):
            return
        self.call_later(self.refresh_list, name)
        self.status(f"using {name or 'no profile'}; the model reloads with its adapter")

    @on(Button.Pressed, "#use")
    def _use(self) -> None:
        self.action_use()

    def action_activate(self) -> None:
        name = self.selected()
        choice = self.query_one("#adapters", Select).value
        if name is None or choice is Select.BLANK:
            self.status("pick a profile with a trained adapter first")
            return
        prof = profiles.load_profile(name)
        try:
            profiles.set_active_adapter(prof, prof.adapters_dir / str(choice), tam=profiles.active_tam(prof))
        except CopeError as exc:
            self.status(f"error: {exc}")
            return
        self.status(f"{name}: drafts now use {choice}")
        if name == self.app.profile_name:
            self.app.load_model()
        self.show_info()

    @on(Button.Pressed, "#activate")
    def _activate(self) -> None:
        self.action_activate()

    def action_from_edits(self) -> None:
        """DPO on the highlighted profile's edit pairs, then export, verify, activate (`--from-edits`)."""
        self.action_train(from_edits=True)

    @on(Button.Pressed, "#from-edits")
    def _from_edits_pressed(self) -> None:
        self.action_from_edits()

    def action_train(self, stages: list[str] | None = None, settings: list[str] | None = None,
                     from_edits: bool = False) -> None:
        """Train the highlighted profile: all stages, or `stages`, or on its edits; `settings` are `--set KEY=VALUE`."""
        name = self.selected()
        if name is None:
            self.status("pick a profile to train (or create one: n)")
            return
        if self.training is not None:
            self.status(f"already training {self.training_profile}; x cancels")
            return
        for row in self.query(StageRow):
            row.reset()
        self.seen_stages: set[str] = set()
        self.off_stages: set[str] = set()  # turned off by the settings (e.g. dpo = false)
        self.training_profile = name
        self.query_one("#cancel", Button).disabled = False
        self.query_one("#train", Button).disabled = True
        self.query_one("#train-dpo", Button).disabled = True
        self.query_one("#from-edits", Button).disabled = True
        extra = (["--stages", ",".join(stages)] if stages else []) + [a for kv in settings or [] for a in ("--set", kv)]
        if from_edits:
            extra.append("--from-edits")
            self.status(f"{name}: learning from your edits: dpo → export → activate (x cancels)")
        else:
            self.status(f"training {name}: {' → '.join(stages or STAGES)} (x cancels; Train again resumes)")
        self.train_kind = "edits" if from_edits else "stages" if stages else "all"
        self._train_worker(name, extra)

    @on(Button.Pressed, "#train")
    def _train(self) -> None:
        self.action_train()

    def action_train_dpo(self) -> None:
        """Train with the paper's synthetic negatives + DPO too (`--dpo`); drafts then default to cope mode."""
        self.action_train(settings=["dpo=true"])

    @on(Button.Pressed, "#train-dpo")
    def _train_dpo(self) -> None:
        self.action_train_dpo()

    @work(thread=True, exclusive=True, group="train")
    def _train_worker(self, name: str, extra: list[str]) -> None:
        def started(run: TrainRun) -> None:
            self.training = run

        def progress(p: Progress) -> None:
            self.app.call_from_thread(self._progress, p)

        try:
            code, err = run_training(name, progress, extra=extra, started=started)
        except OSError as exc:
            code, err = 1, str(exc)
        self.app.call_from_thread(self._trained, name, code, err)

    def _progress(self, p: Progress) -> None:
        self.seen_stages.add(p.stage)
        if p.state == "off":
            self.off_stages.add(p.stage)
        done_before = STAGES.index(p.stage)
        for row in self.query(StageRow):
            if row.stage in self.off_stages:
                pass
            elif (self.train_kind != "edits" and STAGES.index(row.stage) < done_before
                  and row.query_one(ProgressBar).progress < 1.0):
                row.query_one(ProgressBar).update(total=1.0, progress=1.0)
            if row.stage == p.stage:
                row.set(p)

    def _trained(self, name: str, code: int, err: str) -> None:
        cancelled = self.training is not None and self.training.cancelled
        self.training = None
        self.training_profile = None
        self.query_one("#cancel", Button).disabled = True
        if code == 0 and self.train_kind in ("stages", "edits"):
            for row in self.query(StageRow):
                if row.stage in self.seen_stages - self.off_stages:
                    row.query_one(ProgressBar).update(total=1.0, progress=1.0)
            if self.train_kind == "stages":
                self.status(f"{name}: the chosen stages ran; Train runs the rest")
            else:
                self.status(f"{name} learned from your edits; its new adapter is active")
                if name == self.app.profile_name:
                    self.app.load_model()
        elif code == 0:
            for row in self.query(StageRow):
                if row.stage not in self.off_stages:
                    row.query_one(ProgressBar).update(total=1.0, progress=1.0)
            self.status(f"{name} trained; its new adapter is active")
            if name == self.app.profile_name:
                self.app.load_model()
        elif cancelled or code in (130, -2):
            self.status(f"training {name} stopped; Train (t) resumes where it stopped")
        else:
            self.status(f"training {name} failed: {err}")
        self.show_info()

    def action_cancel(self) -> None:
        if self.training is None:
            self.status("nothing is training")
            return
        self.training.cancel()
        self.status("cancelling: the current step finishes and a checkpoint is saved…")

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.action_cancel()
