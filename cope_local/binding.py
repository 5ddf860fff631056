"""Which base an adapter was made for: fingerprints and the check the decoder runs.

llama.cpp loads any adapter whose tensor shapes fit the base, so an adapter
trained on another model with the same shapes (another fine-tune, an edited
copy) loads silently and writes garbage. Every adapter we export records a
fingerprint of its base: a hash of the tensor names, shapes, types and bytes,
plus the tokenizer and hyper-parameters. Metadata that does not change the
model (general.*, the chat template, cope.* keys) is left out, so renaming a
file or editing its description keeps the binding.

A base re-encoded by `cope convert base` (an F32/F16/Q8_0 copy, not a merge)
records `cope.source.fingerprint`, the fingerprint of the original; an adapter
matches a base when their lineages ({own, source}) intersect.

Headers are parsed by cope_local.gguf_file.read_header (~0.05 s). Hashing a 100 MB base takes ~0.07 s
(sha256 with SHA-NI), a 500 MB F32 copy ~0.35 s, and the result is cached
under home()/cache keyed on (path, size, mtime_ns, inode). No torch here: the
decoder imports this module.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.gguf_file import read_header

FINGERPRINT_SCHEME = "cfp1"  # bump when the hashed content changes; old caches then miss
KEY_VERSION = "cope.version"
KEY_BASE_FP = "cope.base.fingerprint"  # fingerprint of the GGUF the adapter was trained on
KEY_BASE_TOKENIZER_FP = "cope.base.tokenizer_fingerprint"  # its tokenizer alone (for clearer errors)
KEY_BASE_SOURCE_FP = "cope.base.source_fingerprint"  # that base's own cope.source.fingerprint, if any
KEY_BASE_NAME = "cope.base.name"
KEY_BASE_FILE = "cope.base.file"
KEY_CREATED = "cope.created"
KEY_SOURCE_FP = "cope.source.fingerprint"  # in a base: fingerprint of the model it was re-encoded from
KEY_SOURCE_NAME = "cope.source.name"
TRAIN_PREFIX = "cope.train."

# --- fingerprints ---------------------------------------------------------------------------

def _hashed_key(key: str) -> bool:
    """Keys that define the model's behaviour (hyper-parameters, tokenizer), not its labels."""
    if key.startswith(("general.", "cope.", "split.", "GGUF.")):
        return False
    if key.startswith("tokenizer.chat_template"):
        return False  # prompt formatting, not the model: editing it keeps adapters valid
    return True


def _compute(path: Path) -> dict:
    hdr = read_header(path, what="base model")
    full = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\0")
    tok = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\0tok\0")
    full.update(hdr.architecture.encode() + b"\0")
    for key in sorted(hdr.raw):
        if not _hashed_key(key):
            continue
        vtype, data = hdr.raw[key]
        item = key.encode() + b"\0" + struct.pack("<I", vtype) + data
        full.update(item)
        if key.startswith("tokenizer."):
            tok.update(item)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = memoryview(mm)
            for name in sorted(hdr.tensors):
                t = hdr.tensors[name]
                full.update(name.encode() + b"\0" + struct.pack(f"<I{len(t.shape)}Q", t.ggml_type, *t.shape))
                full.update(view[t.offset:t.offset + t.n_bytes])  # hashlib drops the GIL on big buffers
            view.release()
        finally:
            mm.close()
    return {
        "fingerprint": full.hexdigest()[:32],
        "tokenizer": tok.hexdigest()[:16],
        "source": str(hdr.values.get(KEY_SOURCE_FP) or ""),
        "name": str(hdr.values.get("general.name") or path.stem),
        "architecture": hdr.architecture,
    }


def _cache_file() -> Path | None:
    try:
        from cope_local.paths import home

        folder = home() / "cache"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder / "fingerprints.json"
    except OSError:
        return None  # read-only home: fingerprints still work, uncached


def fingerprint_info(gguf_path: str | os.PathLike) -> dict:
    """{fingerprint, tokenizer, source, name, architecture} of a GGUF, cached by (path, size, mtime, inode)."""
    path = Path(gguf_path)
    try:
        st = path.stat()
    except OSError:
        read_header(path, what="base model")  # raises the clear error
        raise
    key = f"{FINGERPRINT_SCHEME}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_path = _cache_file()
    cache = {}
    if cache_path is not None and cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return dict(cache[key])
    info = _compute(path)
    if cache_path is not None:
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{FINGERPRINT_SCHEME}|{path.resolve()}|")}
        cache[key] = info
        if len(cache) > 128:  # keep the newest entries only
            cache = dict(list(cache.items())[-128:])
        try:
            from cope_local.paths import atomic_write_text

            atomic_write_text(cache_path, json.dumps(cache, indent=0))
        except OSError:
            pass
    return info


def base_fingerprint(gguf_path: str | os.PathLike) -> str:
    """Hash of a base's tensors (names, shapes, types, bytes), tokenizer and hyper-parameters."""
    return fingerprint_info(gguf_path)["fingerprint"]


# --- binding ----------------------------------------------------------------------------------

_SUMMARY_KEY = re.compile(r"^[a-z][a-z0-9_.]*$")


def binding_metadata(base_gguf_path: str | os.PathLike, summary: dict | None = None) -> dict:
    """Key/values to write into an adapter GGUF made for `base_gguf_path`.

    `summary` is the training summary (task, examples, steps, ...); each entry is
    written as `cope.train.<key>` (str, int, float or bool values).
    """
    from cope_local import __version__

    info = fingerprint_info(base_gguf_path)
    meta: dict = {
        KEY_VERSION: __version__,
        KEY_BASE_FP: info["fingerprint"],
        KEY_BASE_TOKENIZER_FP: info["tokenizer"],
        KEY_BASE_NAME: info["name"],
        KEY_BASE_FILE: Path(base_gguf_path).name,
        KEY_CREATED: _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if info["source"]:
        meta[KEY_BASE_SOURCE_FP] = info["source"]
    for k, v in (summary or {}).items():
        if v is None:
            continue
        if not _SUMMARY_KEY.match(str(k)):
            raise CopeError(f"training summary key {k!r} is not a valid metadata name (use lower_case letters, digits, _ and .)")
        if not isinstance(v, (str, int, float, bool)):
            v = str(v)
        meta[TRAIN_PREFIX + str(k)] = v
    return meta


@dataclass
class BindingResult:
    status: str  # "match", "unbound" (foreign adapter, no binding) or "forced" (mismatch overridden)
    message: str = ""


def check_binding(adapter_path: str | os.PathLike, base_path: str | os.PathLike, force: bool = False) -> BindingResult:
    """Refuse (CopeError, one line) an adapter that was made for another base.

    Adapters without binding metadata (made by other tools) are allowed with a
    warning. `force=True` turns a mismatch into a warning.
    """
    adapter_path, base_path = Path(adapter_path), Path(base_path)
    ad = read_header(adapter_path, what="adapter")
    if not ad.is_adapter:
        raise CopeError(f"{adapter_path}: is a base model, not a LoRA adapter; pass the adapter file (export one with `cope convert adapter`)")
    base_hdr = read_header(base_path, what="base model")
    if base_hdr.is_adapter:
        raise CopeError(f"{base_path}: is a LoRA adapter, not a base model; give the base model file")
    if ad.architecture != base_hdr.architecture:
        msg = (f"{adapter_path}: adapter is for architecture {ad.architecture!r} but the base {base_path.name} is "
               f"{base_hdr.architecture!r}; use the base it was trained on")
        raise CopeError(msg)  # llama.cpp would refuse it anyway: --force cannot help
    want = ad.get(KEY_BASE_FP)
    if not want:
        msg = (f"{adapter_path}: has no cope-local binding (not exported by `cope convert adapter`), "
               f"so it cannot be checked against {base_path.name}; make sure it was trained on this base")
        warnings.warn(msg, stacklevel=2)
        return BindingResult("unbound", msg)
    base = fingerprint_info(base_path)
    adapter_lineage = {str(want)} | ({str(ad.get(KEY_BASE_SOURCE_FP))} if ad.get(KEY_BASE_SOURCE_FP) else set())
    base_lineage = {base["fingerprint"]} | ({base["source"]} if base["source"] else set())
    if adapter_lineage & base_lineage:
        return BindingResult("match")
    detail = ""
    if ad.get(KEY_BASE_TOKENIZER_FP):
        detail = ("a different tokenizer" if ad.get(KEY_BASE_TOKENIZER_FP) != base["tokenizer"]
                  else "the same tokenizer but different weights")
        detail = f", {detail}"
    msg = (f"{adapter_path}: made for base {ad.get(KEY_BASE_NAME) or '?'!s} ({ad.get(KEY_BASE_FILE) or '?'}, fingerprint "
           f"{str(want)[:12]}) but {base_path.name} is another model (fingerprint {base['fingerprint'][:12]}{detail}); "
           f"use the base it was trained on, or pass --force to load it anyway")
    if force:
        warnings.warn(msg, stacklevel=2)
        return BindingResult("forced", msg)
    raise CopeError(msg)
