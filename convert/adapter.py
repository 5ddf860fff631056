"""peft LoRA folder -> GGUF LoRA adapter that llama.cpp loads, bound to its base.

The output has `general.type=adapter`, `adapter.type=lora`,
`adapter.lora.alpha`, the base's `general.architecture`, tensors
`<target>.lora_a` (A as peft stores it, (r, in)) and `<target>.lora_b`
(B, (out, r), rows permuted for llama q/k), and the binding keys from
`cope_local.binding.binding_metadata` (base fingerprint, cope version,
training summary). Nothing here touches the network: the base's layout comes
from the GGUF given, never from a hub.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from convert.gguf_io import OUTTYPES, PlannedTensor, out_qtype, write_gguf
from convert.lora import read_peft_lora, to_gguf_layout
from cope_local.binding import binding_metadata
from cope_local.errors import CopeError
from cope_local.gguf_file import read_header


@dataclass
class AdapterExport:
    path: Path
    architecture: str
    n_pairs: int  # LoRA (A, B) pairs written
    rank: int  # largest rank
    alpha: float
    bytes: int
    seconds: float
    notes: list = field(default_factory=list)


def export_adapter(peft_dir: str | os.PathLike, base_gguf: str | os.PathLike, out: str | os.PathLike, *,
                   outtype: str = "f32", summary: dict | None = None, name: str | None = None,
                   permute_qk: bool = True) -> AdapterExport:
    """Write `out` (atomically) from the peft adapter in `peft_dir`, trained on `base_gguf`.

    summary: training summary written as cope.train.* (task, examples, steps, ...).
    permute_qk=False is for the test proving the rotary permutation matters; never use it otherwise.
    """
    t0 = time.perf_counter()
    if outtype not in OUTTYPES:
        raise CopeError(f"unknown --outtype {outtype!r}; use one of: {', '.join(OUTTYPES)}")
    if Path(out).resolve() == Path(base_gguf).resolve():
        raise CopeError(f"{out}: is the base model itself; write the adapter to another file")
    base = read_header(base_gguf, what="base model")
    if base.is_adapter:
        raise CopeError(f"{base.path}: is a LoRA adapter, not a base model; give the base GGUF the adapter was trained on with --base")
    lora = read_peft_lora(peft_dir)
    layout = to_gguf_layout(lora, base, permute_qk=permute_qk)
    binding = binding_metadata(base.path, summary)
    adapter_name = name or Path(peft_dir).resolve().name

    def kv(w) -> None:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(layout.alpha))
        w.add_name(adapter_name)
        for key, val in binding.items():
            if isinstance(val, bool):
                w.add_bool(key, val)
            elif isinstance(val, int):
                w.add_int64(key, val) if abs(val) >= 2**31 else w.add_int32(key, val)
            elif isinstance(val, float):
                w.add_float32(key, val)
            else:
                w.add_string(key, str(val))

    planned = []
    for target in sorted(layout.pairs, key=_tensor_order):
        a, b = layout.pairs[target]
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            planned.append(PlannedTensor(target + suffix, tuple(arr.shape), out_qtype(arr.shape, outtype, target),
                                         (lambda arr=arr: arr)))
    path = write_gguf(out, base.architecture, kv, planned, check=_verify_written, mode=0o600)  # derived from private text
    return AdapterExport(
        path=path,
        architecture=base.architecture,
        n_pairs=len(layout.pairs),
        rank=max(a.shape[0] for a, _ in layout.pairs.values()),
        alpha=layout.alpha,
        bytes=path.stat().st_size,
        seconds=time.perf_counter() - t0,
        notes=layout.notes,
    )


def _tensor_order(name: str):
    """blk.2 before blk.10; non-block tensors first."""
    parts = name.split(".")
    if parts[0] == "blk" and parts[1].isdigit():
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0, 0, name)


def _verify_written(tmp: Path) -> None:
    hdr = read_header(tmp, what="adapter")  # raises if what we wrote does not parse back
    if not hdr.is_adapter or hdr.get("adapter.type") != "lora":
        raise CopeError(f"{tmp}: internal error: written adapter does not read back as a LoRA adapter")
