"""The training config of one run: defaults < profile's [train] < --config FILE < --set k=v < flags.

    cfg = load_config(profile, config_file="fast.toml", sets=["user.lr=3e-4", "dpo=false"], device="cpu")

Values from --set are TOML literals (`3e-4`, `true`, `["q_proj","v_proj"]`);
anything that does not parse as one is taken as a string. Every value is
checked against the type of its default, so a typo is an error naming where
it came from, never a silent no-op.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.train.config import LoraSpec, TrainConfig


def parse_value(text: str):
    """A --set value: a TOML literal if it is one, else the text itself."""
    text = text.strip()
    try:
        import tomllib

        return tomllib.loads(f"v = {text}")["v"]
    except ModuleNotFoundError:  # Python 3.10: JSON covers numbers, booleans, strings and lists
        try:
            return json.loads(text)
        except ValueError:
            return text
    except Exception:  # noqa: BLE001 - tomllib.TOMLDecodeError: a bare word is a string
        return text


def parse_sets(sets) -> dict:
    out = {}
    for item in sets or ():
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise CopeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set user.lr=3e-4")
        out[key.strip()] = parse_value(value)
    return out


def _apply(cfg: TrainConfig, overrides: dict, where: str) -> TrainConfig:
    if not overrides:
        return cfg
    if not isinstance(overrides, dict):
        raise CopeError(f"{where}: the training settings must be a table of key = value")
    try:
        new = cfg.updated(overrides)
    except (KeyError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise CopeError(f"{where}: {msg}") from None
    check_types(new, where)
    return new


def _ok(value, annotation: str) -> bool:
    """Does `value` fit the field's declared type (annotations are strings: see config.py's __future__ import)?"""
    kind = str(annotation).replace(" ", "")
    if value is None:
        return "None" in kind
    kind = kind.replace("|None", "")
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple"):
        return isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
    return True


def check_types(cfg: TrainConfig, where: str) -> None:
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, LoraSpec):
            for g in fields(LoraSpec):
                v = getattr(value, g.name)
                if not _ok(v, g.type):
                    raise CopeError(f"{where}: {f.name}.{g.name} = {v!r} should be of type {g.type}")
            if isinstance(value.targets, list):
                setattr(cfg, f.name, LoraSpec(**{**value.__dict__, "targets": tuple(value.targets)}))
        elif not _ok(value, f.type):
            raise CopeError(f"{where}: {f.name} = {value!r} should be of type {f.type}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise CopeError(f"{where}: max_steps = {cfg.max_steps} should be at least 1")


def load_config(profile=None, *, config_file: str | os.PathLike | None = None, sets=(), device: str | None = None,
                max_steps: int | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """The merged TrainConfig for a run (see the module docstring for the order)."""
    cfg = base or TrainConfig()
    if profile is not None:
        table = (profile.extra or {}).get("train")
        cfg = _apply(cfg, table or {}, f"{profile.toml_path} [train]")
    if config_file:
        from cope_local.profile import load_toml

        path = Path(config_file).expanduser()
        if not path.is_file():
            raise CopeError(f"--config {path}: no such file; give a TOML file with a [train] table")
        data = load_toml(path)
        cfg = _apply(cfg, data.get("train", data), str(path))
    cfg = _apply(cfg, parse_sets(sets), "--set")
    if device:
        cfg = _apply(cfg, {"device": device}, "--device")
    if max_steps is not None:
        if max_steps < 1:
            raise CopeError(f"--max-steps {max_steps}: must be at least 1")
        cfg = _apply(cfg, {"max_steps": int(max_steps)}, "--max-steps")
    return cfg


def changed_settings(cfg: TrainConfig) -> dict:
    """Flat {key: value} of what differs from the defaults (printed at the start of a run)."""
    ref, out = TrainConfig().as_dict(), {}
    for key, value in cfg.as_dict().items():
        if isinstance(value, dict):
            for k, v in value.items():
                if ref[key][k] != v and not (isinstance(v, (list, tuple)) and list(v) == list(ref[key][k])):
                    out[f"{key}.{k}"] = v
        elif ref[key] != value:
            out[key] = value
    return out
