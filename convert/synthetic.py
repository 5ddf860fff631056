"""A random LoRA adapter GGUF for a base model, written without torch.

For tests and benchmarks of the decoder that need *an* adapter before any
training (and for a zero-weight adapter, which must leave the base unchanged).
The layout is the one `convert.adapter` writes for a trained peft adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cope_local.gguf_file import check_model
from cope_local.paths import atomic_path


def write_random_lora(
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int = 8,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ("attn_q", "attn_v"),
    std: float = 0.02,
    zero: bool = False,
    seed: int = 0,
) -> Path:
    """Write a LoRA on `targets` (GGUF names, e.g. attn_q) of every block of `base`."""
    import gguf

    info = check_model(base)
    rng = np.random.default_rng(seed)
    writer_path = Path(out)
    with atomic_path(writer_path, mode=0o644) as tmp:
        w = gguf.GGUFWriter(tmp, info.architecture)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(f"random LoRA r{rank} for {info.name}")
        try:
            from cope_local.binding import binding_metadata

            for key, value in binding_metadata(base, {"task": "synthetic", "examples": 0, "steps": 0}).items():
                (w.add_uint64 if isinstance(value, int) else w.add_string)(key, value)
        except ImportError:
            pass
        for name, (shape, _) in sorted(info.tensors.items()):
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in targets or parts[3] != "weight":
                continue
            out_dim, in_dim = shape
            a = rng.normal(0.0, std, size=(rank, in_dim)).astype(np.float32)  # (r, in)
            b = rng.normal(0.0, std, size=(out_dim, rank)).astype(np.float32)  # (out, r)
            if zero:
                b[:] = 0.0
            w.add_tensor(f"{name}.lora_a", a)
            w.add_tensor(f"{name}.lora_b", b)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return writer_path
