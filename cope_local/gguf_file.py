"""Read and check GGUF files with the gguf package before llama.cpp sees them.

llama.cpp answers a bad file with a null pointer (or worse); here every
defect becomes one CopeError line naming the file and the fix: missing,
not GGUF, truncated, unknown architecture, adapter for another base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cope_local.errors import CopeError

GGUF_MAGIC = b"GGUF"

# Architectures the decoder and converter are tested on.
KNOWN_ARCHITECTURES = ("llama", "qwen2", "gemma3")


@dataclass
class GGUFInfo:
    """What a GGUF file is, from its header (no weights are read)."""

    path: Path
    kind: str  # "model" or "adapter"
    architecture: str
    name: str
    n_params: int
    quantization: str  # dominant tensor type of the 2-D weights, e.g. "Q4_1"
    context_length: int | None
    has_chat_template: bool
    add_bos: bool | None
    metadata: dict = field(repr=False, default_factory=dict)  # scalar/string key-values
    tensors: dict = field(repr=False, default_factory=dict)  # name -> (shape tuple, type name)

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "name": self.name,
            "architecture": self.architecture,
            "parameters": self.n_params,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "chat_template": self.has_chat_template,
            "add_bos": self.add_bos,
        }


def _field_value(reader, key: str):
    fld = reader.fields.get(key)
    if fld is None:
        return None
    try:
        return fld.contents()
    except Exception:  # arrays of odd types: we only read scalars and strings here
        return None


def read_info(path: str | os.PathLike, *, what: str = "model") -> GGUFInfo:
    """Parse the header of `path`; raise CopeError for anything llama.cpp would choke on."""
    path = Path(path)
    if not path.exists():
        raise CopeError(f"{path}: no such {what} file; check the path (`cope models list` shows known models)")
    if path.is_dir():
        raise CopeError(f"{path}: is a folder, not a GGUF {what} file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CopeError(f"{path}: not a GGUF file (magic {magic!r}); give a .gguf {what} (convert with `cope convert`)")
    import gguf  # numpy only; no torch

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:
        raise CopeError(f"{path}: GGUF header unreadable ({type(exc).__name__}: {exc}); the file is truncated or corrupt, copy it again") from None
    tensors = {}
    end = 0
    for t in reader.tensors:
        end = max(end, int(t.data_offset) + int(t.n_bytes))
        tensors[t.name] = (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
    if end > size:
        raise CopeError(f"{path}: truncated ({size} bytes, tensors need {end}); copy or export the file again")
    meta = {}
    for key in reader.fields:
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.add_bos_token",
                                                              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            continue  # vocab arrays: large and not needed for checks
        val = _field_value(reader, key)
        if val is not None:
            meta[key] = val
    arch = meta.get("general.architecture")
    if not arch:
        raise CopeError(f"{path}: GGUF has no general.architecture; it was not written by a llama.cpp-compatible tool")
    kind = "adapter" if meta.get("general.type") == "adapter" else "model"
    n_params = sum(_numel(shape) for shape, _ in tensors.values())
    types = {}
    for shape, tname in tensors.values():
        if len(shape) == 2:
            types[tname] = types.get(tname, 0) + _numel(shape)
    quant = max(types, key=types.get) if types else "?"
    if kind == "model" and meta.get("general.file_type") is not None:
        quant = _file_type_name(int(meta["general.file_type"]), quant)
    return GGUFInfo(
        path=path,
        kind=kind,
        architecture=str(arch),
        name=str(meta.get("general.name") or path.stem),
        n_params=n_params,
        quantization=quant,
        context_length=_int_or_none(meta.get(f"{arch}.context_length")),
        has_chat_template=bool(meta.get("tokenizer.chat_template")),
        add_bos=meta.get("tokenizer.ggml.add_bos_token"),
        metadata=meta,
        tensors=tensors,
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _int_or_none(v):
    return int(v) if v is not None else None


def _file_type_name(file_type: int, fallback: str) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return fallback


def check_model(path: str | os.PathLike) -> GGUFInfo:
    """A base model the decoder can load, or CopeError."""
    info = read_info(path, what="model")
    if info.kind != "model":
        raise CopeError(f"{info.path}: is a LoRA adapter, not a base model; pass it with --adapter and give the base with --model")
    if info.architecture not in KNOWN_ARCHITECTURES:
        raise CopeError(f"{info.path}: architecture {info.architecture!r} is not supported (supported: {', '.join(KNOWN_ARCHITECTURES)})")
    return info


def check_adapter(path: str | os.PathLike, base: GGUFInfo) -> GGUFInfo:
    """A LoRA adapter whose architecture and tensor shapes fit `base`, or CopeError."""
    info = read_info(path, what="adapter")
    if info.kind != "adapter" or info.metadata.get("adapter.type") != "lora":
        raise CopeError(f"{info.path}: not a LoRA adapter (general.type={info.metadata.get('general.type')!r}); export one with `cope convert adapter`")
    if info.architecture != base.architecture:
        raise CopeError(f"{info.path}: adapter is for architecture {info.architecture!r} but the base {base.path.name} is {base.architecture!r}; use an adapter trained on this base")
    for name, (shape, _) in info.tensors.items():
        if not name.endswith(".lora_a") and not name.endswith(".lora_b"):
            continue
        target = name.rsplit(".", 1)[0]
        if target not in base.tensors:
            raise CopeError(f"{info.path}: adapter tensor {name} has no target {target} in the base {base.path.name}; use an adapter trained on this base")
        out_dim, in_dim = base.tensors[target][0]
        if name.endswith(".lora_a") and shape[-1] != in_dim or name.endswith(".lora_b") and shape[0] != out_dim:
            raise CopeError(
                f"{info.path}: adapter tensor {name} has shape {list(shape)} but the base {base.path.name} has {target} "
                f"{[out_dim, in_dim]}; this adapter was trained on another base"
            )
    return info
