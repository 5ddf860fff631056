"""Where a pipeline runs (a profile or a TAM folder), and the task adapters (TAM) profiles build on.

    <home()>/tams/NAME/
        tam.toml        task, data, model, created (written by `cope tam train`)
        items.jsonl     the non-personal corpus, ingested
        stages/         inputs, pairs, sft (as for a profile)
        peft/           the TAM as a peft folder (training merges it into the base)
        tam.gguf        the TAM as a GGUF LoRA (the decoder's amateur and expert load it)
        tam.json        task, base fingerprint, examples, steps: written last, so its presence means "complete"

A profile points to a TAM with `tam_adapter = "NAME"` (or a folder path) in
its [train] table or `--set tam_adapter=NAME`; a TAM made for another base
model is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cope_local.errors import CopeError, TooFewItems
from cope_local.paths import atomic_write_text
from cope_local.tasks import Task, get_task


def tams_dir() -> Path:
    from cope_local.paths import home

    path = home() / "tams"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@dataclass
class TamRef:
    name: str
    path: Path
    peft_dir: Path  # merged into the base for SFT / DPO
    gguf: Path  # loaded by the decoder (amateur and expert)
    key: str  # content hash: a retrained TAM invalidates the stages built on it


def _utc() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def resolve_tam(spec: str, base: Path) -> TamRef | None:
    """cfg.tam_adapter -> the TAM, checked to be complete and made for `base`; "" -> None."""
    from cope_local.binding import base_fingerprint
    from cope_local.train.sft import file_sha

    if not spec:
        return None
    path = Path(spec).expanduser()
    if not (os.sep in spec or path.is_dir()):
        path = tams_dir() / spec
    meta_path = path / "tam.json"
    if not meta_path.exists():
        raise CopeError(f"tam_adapter {spec!r}: no trained TAM at {path}; train one with "
                        f"`cope tam train --task TASK --data FILE --name {path.name}` or unset tam_adapter")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise CopeError(f"{meta_path}: unreadable; train the TAM again with `cope tam train`") from None
    if meta.get("base_fingerprint") != base_fingerprint(base):
        raise CopeError(f"{path}: this TAM was trained on {meta.get('base_name', 'another model')}, not on {base.name}; "
                        "train a TAM for this model or unset tam_adapter")
    ref = TamRef(path.name, path, path / "peft", path / "tam.gguf", "")
    for p in (ref.peft_dir / "adapter_config.json", ref.gguf):
        if not p.exists():
            raise CopeError(f"{p}: missing; train the TAM again with `cope tam train`")
    ref.key = file_sha(ref.gguf)
    return ref


@dataclass
class Workspace:
    """A folder the pipeline runs in: a user's profile, or a TAM."""

    kind: str  # "profile" | "tam"
    name: str
    path: Path
    task: Task
    model: str | None  # base model name or path; None = the default
    profile: object = None  # cope_local.profile.Profile for kind "profile"

    @property
    def items_path(self) -> Path:
        return self.path / "items.jsonl"

    @property
    def stages_dir(self) -> Path:
        return self.path / "stages"

    @classmethod
    def from_profile(cls, p) -> Workspace:
        return cls("profile", p.name, p.path, p.task_spec(), p.model, p)

    def items(self):
        from cope_local.ingest import read_items

        return read_items(self.items_path)

    def check_size(self, n: int, what: str) -> None:
        from cope_local.paths import profiles_dir
        from cope_local.profile import MIN_ITEMS

        if n < MIN_ITEMS:
            if self.kind == "tam":
                fix = "give --data a larger corpus"
            elif self.path.parent == profiles_dir():
                fix = (f"add more of your writing: create the profile again with more --from sources "
                       f"(`cope profile delete {self.name}` first)")
            else:  # a benchmark user's workspace (cope eval): nothing to add, the run skips the user
                fix = "a benchmark user with so little history is skipped"
            raise TooFewItems(f"{self.items_path}: only {n} {what}, need at least {MIN_ITEMS} to learn a voice; {fix}")

    def train_command(self, stage: str) -> str:
        if self.kind == "profile":
            return f"cope profile train {self.name} --stages {stage}"
        return f"cope tam train --name {self.name} --task {self.task.name} --data FILE"

    # ---- export and activation -------------------------------------------------------------
    def export_path(self) -> Path:
        if self.kind == "tam":
            return self.path / "tam.gguf"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = self.path / "adapters" / f"{self.name}-{stamp}.gguf"
        n = 1
        while path.exists():
            n += 1
            path = path.with_name(f"{self.name}-{stamp}-{n}.gguf")
        return path

    def is_active(self, adapter: Path) -> bool:
        if self.kind == "tam":
            return adapter.exists()
        from cope_local.profile import active_adapter

        try:
            current = active_adapter(self.profile)
        except CopeError:
            return False
        return current is not None and adapter.exists() and current.resolve() == adapter.resolve()

    def activate(self, adapter: Path, tam_gguf: Path | None, keep: int = 2) -> None:
        """Point active.json at `adapter`; keep it and the previously active one, delete our older exports."""
        from cope_local.profile import active_adapter, set_active_adapter

        try:
            previous = active_adapter(self.profile)
        except CopeError:
            previous = None
        set_active_adapter(self.profile, adapter, tam=tam_gguf)
        keep_set = {adapter.resolve()} | ({previous.resolve()} if previous and keep > 1 else set())
        for old in sorted((self.path / "adapters").glob(f"{self.name}-*.gguf")):  # only our own exports
            if old.resolve() not in keep_set:
                old.unlink(missing_ok=True)

    def finish_tam(self, peft_dir: Path, base: Path, sft_info: dict) -> None:
        """Copy the TAM's peft folder to peft/ and write tam.json (last: it marks the TAM complete)."""
        from cope_local.binding import base_fingerprint

        (self.path / "tam.json").unlink(missing_ok=True)  # (export removed it already; a direct call must too)
        tmp = Path(tempfile.mkdtemp(prefix=".peft.", dir=self.path))
        try:
            shutil.copytree(peft_dir, tmp, dirs_exist_ok=True)
            dest = self.path / "peft"
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta = {"name": self.name, "task": self.task.name, "base": str(base), "base_name": base.name,
                "base_fingerprint": base_fingerprint(base), "examples": sft_info.get("examples"),
                "steps": sft_info.get("steps"), "created": _utc()}
        atomic_write_text(self.path / "tam.json", json.dumps(meta, indent=1) + "\n")


def tam_workspace(name: str, task: str, data: str | os.PathLike, model: str | None = None) -> Workspace:
    """Create or refresh home()/tams/NAME from a corpus file or folder (ingested like a profile's history)."""
    from dataclasses import replace

    from cope_local.ingest import IngestConfig, ingest, write_items
    from cope_local.profile import MIN_ITEMS, dump_toml, too_few_message, validate_name

    validate_name(name)
    spec = get_task(task)
    data = Path(data).expanduser().resolve()
    cfg = replace(IngestConfig(), target_fields=spec.target_fields, input_fields=spec.input_fields)
    items, report = ingest([data], config=cfg)
    if len(items) < MIN_ITEMS:
        raise CopeError(too_few_message(len(items), [str(data)], report))
    folder = tams_dir() / name
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_items(folder / "items.jsonl", items)
    toml = {"task": spec.name, "data": str(data), "created": _utc()}
    if model:
        toml["model"] = str(model)
    atomic_write_text(folder / "tam.toml", "# cope-local task adapter (TAM); written by `cope tam train`\n" + dump_toml(toml))
    return Workspace("tam", name, folder, spec, model)
