"""`cope convert check`: what a GGUF file is, and whether it fits a base, on one screen.

Reads headers only (fast parser from cope_local.binding); with a base it
also checks architecture, tensor shapes and the binding fingerprint, and with
`load=True` asks stock llama.cpp to load the pair.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from cope_local import binding
from cope_local.errors import CopeError
from cope_local.gguf_file import GGUFHeader, read_header


def _type_name(t: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(t).name
    except ValueError:
        return str(t)


def _summary(h: GGUFHeader) -> dict:
    arch = h.architecture
    v = h.values
    params = 0
    types: Counter = Counter()
    for t in h.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        params += n
        if len(t.shape) >= 2:
            types[_type_name(t.ggml_type)] += n
    info = {
        "path": str(h.path),
        "bytes": h.size,
        "kind": "adapter" if h.is_adapter else "model",
        "architecture": arch,
        "name": v.get("general.name"),
        "tensors": len(h.tensors),
        "parameters": params,
        "types": dict(types.most_common()),
    }
    if h.is_adapter:
        targets = Counter()
        ranks = set()
        layers = set()
        for name, t in h.tensors.items():
            if name.endswith(".lora_a"):
                parts = name.split(".")
                targets[parts[2] if parts[0] == "blk" else parts[0]] += 1
                if parts[0] == "blk":
                    layers.add(int(parts[1]))
                ranks.add(t.shape[1])
        info.update({
            "adapter_type": v.get("adapter.type"),
            "alpha": v.get("adapter.lora.alpha"),
            "rank": sorted(ranks),
            "targets": dict(targets),
            "layers": len(layers),
            "binding": {k: v[k] for k in v if k.startswith("cope.")},
        })
    else:
        info.update({
            "context_length": v.get(f"{arch}.context_length"),
            "layers": v.get(f"{arch}.block_count"),
            "embedding": v.get(f"{arch}.embedding_length"),
            "tokenizer": v.get("tokenizer.ggml.model"),
            "pre_tokenizer": v.get("tokenizer.ggml.pre"),
            "add_bos": v.get("tokenizer.ggml.add_bos_token"),
            "chat_template": bool(v.get("tokenizer.chat_template")),
            "cope": {k: v[k] for k in v if k.startswith("cope.")},
        })
    return info


def _shape_problem(ad: GGUFHeader, base: GGUFHeader) -> str | None:
    for name, t in ad.tensors.items():
        if not name.endswith((".lora_a", ".lora_b")):
            return f"tensor {name} is not a LoRA A/B tensor"
        target = name.rsplit(".", 1)[0]
        bt = base.tensors.get(target)
        if bt is None:
            return f"{target} does not exist in the base"
        if name.endswith(".lora_a") and t.shape[0] != bt.shape[0]:
            return f"{name} takes {t.shape[0]} inputs but {target} has {bt.shape[0]}"
        if name.endswith(".lora_b") and t.shape[1] != bt.shape[1]:
            return f"{name} gives {t.shape[1]} outputs but {target} has {bt.shape[1]}"
    return None


def describe(path: str | os.PathLike, base: str | os.PathLike | None = None, *, load: bool = False) -> dict:
    """Facts about `path`; with `base`, a `fit` verdict {ok, reason, binding}. CopeError if unreadable."""
    h = read_header(path)
    if not h.architecture:
        raise CopeError(f"{path}: GGUF has no general.architecture; it was not written by a llama.cpp-compatible tool")
    info = _summary(h)
    if base is None:
        return info
    bh = read_header(base, what="base model")
    fit = {"base": str(bh.path), "ok": True, "reason": "", "binding": None}
    if bh.is_adapter:
        raise CopeError(f"{base}: is a LoRA adapter, not a base model; give the base model with --base")
    if h.is_adapter:
        problem = None
        if h.architecture != bh.architecture:
            problem = f"adapter is for {h.architecture!r}, the base is {bh.architecture!r}"
        else:
            problem = _shape_problem(h, bh)
        if problem is None:
            import warnings

            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                try:
                    res = binding.check_binding(h.path, bh.path, force=True)
                    fit["binding"] = res.status
                    if res.status == "forced":
                        problem = res.message.split(": ", 1)[1]
                    elif res.status == "unbound":
                        fit["reason"] = "no binding metadata (foreign adapter): shapes fit, the base cannot be verified"
                except CopeError as exc:
                    problem = str(exc).split(": ", 1)[-1]
        if problem:
            fit.update(ok=False, reason=problem)
    else:
        a, b = binding.fingerprint_info(h.path), binding.fingerprint_info(bh.path)
        same = ({a["fingerprint"], a["source"]} - {""}) & ({b["fingerprint"], b["source"]} - {""})
        fit["binding"] = "same model" if same else "different model"
        fit["ok"] = bool(same)
        fit["reason"] = ("the same model (or a re-encoding of it): adapters for one fit the other" if same
                         else "a different model: adapters bound to one are refused on the other")
    if load and fit["ok"]:
        from convert.llama_probe import try_load

        ok, why = try_load(bh.path, h.path if h.is_adapter else None)
        fit["llama_cpp"] = why
        if not ok:
            fit.update(ok=False, reason=why)
    info["fit"] = fit
    return info


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def render(info: dict) -> str:
    """A screenful of text for a human."""
    lines = [f"{info['path']}", f"  kind          {info['kind']} ({info['architecture']}), {_human(info['bytes'])}"]
    if info.get("name"):
        lines.append(f"  name          {info['name']}")
    types = ", ".join(f"{k}" for k in info["types"]) or "-"
    lines.append(f"  tensors       {info['tensors']} ({info['parameters']:,} parameters; {types})")
    if info["kind"] == "adapter":
        lines.append(f"  LoRA          rank {', '.join(map(str, info['rank'])) or '?'}, alpha {info['alpha']}, "
                     f"{info['layers']} layers: {', '.join(sorted(info['targets']))}")
        b = info["binding"]
        if b.get(binding.KEY_BASE_FP):
            lines.append(f"  made for      {b.get(binding.KEY_BASE_NAME)} ({b.get(binding.KEY_BASE_FILE)}, fingerprint {str(b[binding.KEY_BASE_FP])[:12]})")
            train = {k[len(binding.TRAIN_PREFIX):]: val for k, val in b.items() if k.startswith(binding.TRAIN_PREFIX)}
            if train:
                lines.append("  training      " + ", ".join(f"{k}={val}" for k, val in train.items()))
            lines.append(f"  created       {b.get(binding.KEY_CREATED)} by cope-local {b.get(binding.KEY_VERSION)}")
        else:
            lines.append("  made for      unknown (no cope-local binding: made by another tool)")
    else:
        lines.append(f"  layers        {info['layers']}, embedding {info['embedding']}, context {info['context_length']}")
        lines.append(f"  tokenizer     {info['tokenizer']}/{info['pre_tokenizer']}, add_bos={info['add_bos']}, "
                     f"chat template: {'yes' if info['chat_template'] else 'no'}")
        c = info["cope"]
        if c.get(binding.KEY_SOURCE_FP):
            lines.append(f"  re-encoded    from {c.get(binding.KEY_SOURCE_NAME)} (fingerprint {str(c[binding.KEY_SOURCE_FP])[:12]})")
        if c.get("cope.merge.adapter"):
            lines.append(f"  merged        adapter {c['cope.merge.adapter']} into {c.get('cope.merge.base_name', '?')}")
    fit = info.get("fit")
    if fit:
        verdict = "FITS" if fit["ok"] else "DOES NOT FIT"
        lines.append(f"  with base     {Path(fit['base']).name}: {verdict}" + (f" ({fit['reason']})" if fit["reason"] else ""))
        if fit.get("llama_cpp") and fit["ok"]:
            lines.append(f"  llama.cpp     {fit['llama_cpp']}")
    return "\n".join(lines)
