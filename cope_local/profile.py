"""A profile: one user's history, task and trained adapters, in one folder.

    <profiles_dir()>/NAME/
        profile.toml        name, task, me, sources, created, model? (+ any [tables] others add, e.g. [train])
        items.jsonl         the ingested history (HistoryItem per line), 0600
        ingest_report.json  what ingest kept and skipped, and why
        stages/             training stage outputs (written by cope_local.train)
        adapters/           exported GGUF adapters (written by cope_local.train)
        active.json         {"adapter": "adapters/<f>.gguf", "tam": "...gguf"?}: what drafts use (user LoRA, amateur's TAM)

A profile is built in a hidden temp folder and renamed into place, so a
failed or interrupted `create` leaves nothing behind. profile.toml is TOML
written by a tiny writer below (strings as JSON literals, which TOML accepts);
it is read with tomllib, or on Python 3.10 by a reader for that same subset.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.ingest import HistoryItem, IngestConfig, IngestReport, ingest, normalize_me, read_items, write_items
from cope_local.ingest.items import DEFAULT_INPUT_FIELDS, DEFAULT_TARGET_FIELDS
from cope_local.paths import atomic_write_text, profiles_dir
from cope_local.tasks import DEFAULT_TASK, Task, get_task

MIN_ITEMS = 8  # fewer texts than this cannot show a voice (and LoRA overfits at once)
FORMAT = 1  # profile.toml layout version
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CORE_KEYS = ("format", "name", "task", "me", "sources", "created", "model")


@dataclass
class Profile:
    name: str
    path: Path
    task: str
    me: list = field(default_factory=list)  # the user's addresses (mail ingest)
    sources: list = field(default_factory=list)  # --from paths, absolute
    created: str = ""  # ISO 8601, UTC
    model: str | None = None  # base model name or .gguf path the adapters are for; None = the default model
    extra: dict = field(default_factory=dict)  # other profile.toml keys/tables (e.g. [train]); kept on save

    @property
    def toml_path(self) -> Path:
        return self.path / "profile.toml"

    @property
    def items_path(self) -> Path:
        return self.path / "items.jsonl"

    @property
    def report_path(self) -> Path:
        return self.path / "ingest_report.json"

    @property
    def stages_dir(self) -> Path:
        return self.path / "stages"

    @property
    def adapters_dir(self) -> Path:
        return self.path / "adapters"

    @property
    def active_path(self) -> Path:
        return self.path / "active.json"

    def task_spec(self) -> Task:
        return get_task(self.task)

    def items(self) -> list[HistoryItem]:
        return read_items(self.items_path)


# ---- names and places -------------------------------------------------------------------------

def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise CopeError(f"profile name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (no slashes or spaces)")
    return name


def profile_dir(name: str) -> Path:
    return profiles_dir() / validate_name(name)


def profile_names() -> list[str]:
    """Every folder that looks like a profile (has profile.toml), sorted; broken ones included."""
    root = profiles_dir()
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "profile.toml").exists())


# ---- TOML (tiny writer; tomllib or a subset reader to read) -----------------------------------

def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        raise TypeError("TOML has no null; leave the key out")
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict, _prefix: str = "") -> str:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{_prefix}.{_toml_key(k)}" if _prefix else _toml_key(k)
            lines += ["", f"[{name}]", dump_toml(v, name).rstrip("\n")]
    return "\n".join(x for x in lines) + "\n"


def _load_toml_subset(text: str, path: Path) -> dict:
    """Python 3.10: read what dump_toml writes (key = JSON-literal value, [tables], # comments)."""
    data: dict = {}
    table = data
    decoder = json.JSONDecoder()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head = re.fullmatch(r"\[([^\[\]]+)\]", line)
        if head:
            table = data
            for part in head.group(1).split("."):
                part = part.strip().strip('"')
                table = table.setdefault(part, {})
            continue
        m = re.match(r'("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*=\s*', line)
        try:
            if not m:
                raise ValueError("no key = value")
            key = json.loads(m.group(1)) if m.group(1).startswith('"') else m.group(1)
            value, end = decoder.raw_decode(line, m.end())
            rest = line[end:].strip()
            if rest and not rest.startswith("#"):
                raise ValueError("text after the value")
        except ValueError:
            raise CopeError(f"{path}:{n}: cannot read this line without tomllib (Python 3.10); "
                            "use double-quoted strings and one-line lists, or run Python 3.11+") from None
        table[key] = value
    return data


def load_toml(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return _load_toml_subset(text, path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CopeError(f"{path}: not valid TOML ({exc}); fix the file or recreate the profile") from None


# ---- load / save / list / delete --------------------------------------------------------------

def _profile_toml(p: Profile) -> str:
    core = {"format": FORMAT, "name": p.name, "task": p.task, "me": list(p.me), "sources": list(p.sources),
            "created": p.created, "model": p.model or None}
    extra = {k: v for k, v in p.extra.items() if k not in _CORE_KEYS}
    return "# cope-local profile; written by `cope profile create`, safe to edit\n" + dump_toml({**core, **extra})


def save_profile(profile: Profile) -> None:
    """Rewrite profile.toml atomically (e.g. after adding a [train] table to `extra`)."""
    atomic_write_text(profile.toml_path, _profile_toml(profile), mode=0o600)


def load_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        return name
    path = profile_dir(name)
    toml = path / "profile.toml"
    if not toml.exists():
        raise CopeError(f"profile {name!r} not found in {profiles_dir()}; create it with "
                        f"`cope profile create {name} --from PATH` (list them with `cope profile list`)")
    data = load_toml(toml)
    try:
        return Profile(name=str(data.get("name", name)), path=path, task=str(data.get("task", DEFAULT_TASK)),
                       me=[str(x) for x in data.get("me", [])], sources=[str(x) for x in data.get("sources", [])],
                       created=str(data.get("created", "")), model=str(data["model"]) if data.get("model") else None,
                       extra={k: v for k, v in data.items() if k not in _CORE_KEYS})
    except TypeError:
        raise CopeError(f"{toml}: unexpected value types; fix the file or recreate the profile") from None


def load_items(profile: str | Profile) -> list[HistoryItem]:
    return load_profile(profile).items()


def list_profiles() -> list[Profile]:
    """Profiles that load; use profile_names() to also see broken ones."""
    out = []
    for name in profile_names():
        with contextlib.suppress(CopeError, OSError):
            out.append(load_profile(name))
    return out


def delete_profile(name: str) -> Path:
    """Remove a profile folder: renamed away first, so a half-deleted profile is never seen."""
    path = profile_dir(name)
    if not path.exists():
        raise CopeError(f"profile {name!r} not found in {profiles_dir()}; see `cope profile list`")
    trash = Path(tempfile.mkdtemp(prefix=f".{name}.deleting-", dir=profiles_dir()))
    os.replace(path, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    return path


# ---- create ------------------------------------------------------------------------------------

def too_few_message(n: int, sources: Iterable[str], report: IngestReport) -> str:
    where = ", ".join(str(s) for s in sources) or "the given sources"
    why = ""
    if report.skipped:
        why = "; skipped " + ", ".join(f"{c} {r.replace('_', ' ')}" for r, c in report.skipped.most_common())
    hint = ""
    if report.skipped.get("not_from_me"):
        hint = " (is --me the address you send from? or point --from at your Sent folder)"
    return (f"{where}: only {n} usable text{'s' if n != 1 else ''} found, need at least {MIN_ITEMS}{why}; "
            f"add more of your own writing with another --from: sent mail, a folder of .txt/.md files, "
            f"or a JSONL of {{\"input\", \"output\"}} rows{hint}")


def create_profile(name: str, sources: Iterable[str | os.PathLike], task: str = DEFAULT_TASK,
                   me: Iterable[str] = (), config: IngestConfig | None = None, dry_run: bool = False
                   ) -> tuple[Profile | None, list[HistoryItem], IngestReport]:
    """Ingest `sources` into a new profile NAME. dry_run: ingest and report, write nothing, never raise for size."""
    validate_name(name)
    spec = get_task(task)
    final = profile_dir(name)
    if final.exists() and not dry_run:
        raise CopeError(f"{final}: profile {name!r} already exists; delete it with `cope profile delete {name}` "
                        "or choose another name")
    sources = [str(Path(s).expanduser().resolve()) for s in sources]
    if not sources:
        raise CopeError("no --from given; point it at your writing: a Sent mailbox, a Maildir, .txt/.md files or a JSONL")
    cfg = config or IngestConfig()
    if cfg.target_fields == DEFAULT_TARGET_FIELDS:  # the task knows which row field is the user's text
        cfg = replace(cfg, target_fields=spec.target_fields)
    if cfg.input_fields == DEFAULT_INPUT_FIELDS:
        cfg = replace(cfg, input_fields=spec.input_fields)
    items, report = ingest(sources, me=me, config=cfg)
    if dry_run:
        return None, items, report
    if len(items) < MIN_ITEMS:
        raise CopeError(too_few_message(len(items), sources, report))
    me_list = sorted(normalize_me(me))
    profile = Profile(name=name, path=final, task=spec.name, me=me_list, sources=sources,
                      created=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.creating-", dir=profiles_dir()))
    try:
        staged = Profile(**{**profile.__dict__, "path": tmp})
        write_items(staged.items_path, items)
        atomic_write_text(staged.report_path, json.dumps(report.to_dict(), ensure_ascii=False, indent=1), mode=0o600)
        save_profile(staged)
        staged.stages_dir.mkdir(mode=0o700)
        staged.adapters_dir.mkdir(mode=0o700)
        os.chmod(tmp, 0o700)
        if final.exists():
            raise CopeError(f"{final}: profile {name!r} appeared while creating it; delete one and retry")
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CopeError(f"{final}: cannot write the profile ({exc.strerror or exc}); free disk space or fix "
                        "permissions and run the command again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return profile, items, report


# ---- active adapter ----------------------------------------------------------------------------

def _read_active(p: Profile) -> dict:
    try:
        data = json.loads(p.active_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise CopeError(f"{p.active_path}: unreadable; delete it and run `cope profile train {p.name}` again")
    return data


def _active_file(p: Profile, key: str) -> Path | None:
    stored = _read_active(p).get(key)
    if not stored:
        return None
    rel = Path(str(stored))
    path = rel if rel.is_absolute() else p.path / rel
    if not path.is_file():
        raise CopeError(f"{p.active_path}: names {rel}, which is missing; run `cope profile train {p.name}` again")
    return path


def active_adapter(profile: str | Profile) -> Path | None:
    """The user adapter drafts use, or None if none was activated yet."""
    return _active_file(load_profile(profile), "adapter")


def active_tam(profile: str | Profile) -> Path | None:
    """The task adapter (TAM) the amateur uses with the active adapter, or None (amateur = base)."""
    return _active_file(load_profile(profile), "tam")


def set_active_adapter(profile: str | Profile, adapter: str | os.PathLike,
                       tam: str | os.PathLike | None = None) -> Path:
    """Point active.json at `adapter` (and the TAM it was trained on), in one atomic write.

    Readers see the old pair or the new pair, never a mix; verify the adapter loads before calling this.
    """
    p = load_profile(profile)
    record: dict = {}
    for key, value in (("adapter", adapter), ("tam", tam)):
        if value is None:
            continue
        path = Path(value).expanduser().resolve()
        if not path.is_file():
            raise CopeError(f"{path}: no such adapter file; export it before activating")
        try:
            record[key] = str(path.relative_to(p.path.resolve()))
        except ValueError:
            record[key] = str(path)
    record["activated"] = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    atomic_write_text(p.active_path, json.dumps(record, indent=1) + "\n", mode=0o600)
    return Path(adapter).expanduser().resolve()


# ---- summaries (CLI list/show) -----------------------------------------------------------------

def describe(profile: str | Profile, examples: int = 0) -> dict:
    p = load_profile(profile)
    try:
        n_items = sum(1 for line in p.items_path.open(encoding="utf-8") if line.strip())
    except OSError:
        n_items = 0
    try:
        active: str | None = str(active_adapter(p) or "") or None
        tam: str | None = str(active_tam(p) or "") or None
        active_error = None
    except CopeError as exc:
        active, tam, active_error = None, None, str(exc)
    info = {"name": p.name, "path": str(p.path), "task": p.task, "me": p.me, "sources": p.sources,
            "created": p.created, "model": p.model, "items": n_items, "active_adapter": active, "active_tam": tam,
            "adapters": sorted(x.name for x in p.adapters_dir.glob("*.gguf")) if p.adapters_dir.is_dir() else [],
            "stages": sorted(x.name for x in p.stages_dir.iterdir()) if p.stages_dir.is_dir() else []}
    if active_error:
        info["active_error"] = active_error
    with contextlib.suppress(OSError, ValueError):
        info["ingest"] = json.loads(p.report_path.read_text(encoding="utf-8"))
    if examples:
        info["examples"] = [{"input": (i.input or "")[:200] or None, "output": i.output[:200]} for i in p.items()[:examples]]
    return info
