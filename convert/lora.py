"""Read a peft LoRA adapter folder and place its tensors in a GGUF base's layout.

Only what llama.cpp can apply exactly is accepted: plain LoRA (no DoRA, no
LoRA bias, no full-weight `modules_to_save`, no embedding/lm_head LoRA).
Everything else is refused with one line naming the folder and the fix,
never written as a file that loads and computes something else.

peft's scale per module is alpha/r (alpha/sqrt(r) with rsLoRA, with per-module
rank/alpha patterns); llama.cpp's is file_alpha/r. Where they differ the ratio
is folded into B, so the product B @ A * scale is the same.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.arch import EMBEDDING_MODULES, EMBEDDING_TENSORS, gguf_name, head_counts, permute_rows, spec_for
from cope_local.errors import CopeError
from cope_local.gguf_file import GGUFHeader

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass
class PeftLora:
    """A peft LoRA adapter in HF layout: module -> (A (r, in), B (out, r), scale)."""

    folder: Path
    config: dict
    modules: dict = field(default_factory=dict)  # HF module name (no peft prefix) -> (A, B, scale)

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha") or 0.0)


def _pattern_value(patterns: dict, module: str, default):
    for key, val in (patterns or {}).items():  # peft's rule: the key matches a dotted suffix of the name
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def _load_tensors(folder: Path) -> dict:
    st = folder / "adapter_model.safetensors"
    binf = folder / "adapter_model.bin"
    try:
        if st.exists():
            from safetensors import safe_open  # torch framework: reads bf16 too

            with safe_open(str(st), framework="pt") as f:
                return {k: f.get_tensor(k).float().numpy() for k in f.keys()}
        if binf.exists():
            import torch

            state = torch.load(str(binf), map_location="cpu", weights_only=True)  # weights only: no pickled code
            return {k: v.float().numpy() for k, v in state.items()}
    except CopeError:
        raise
    except Exception as exc:
        raise CopeError(f"{folder}: adapter weights unreadable ({type(exc).__name__}: {exc}); the file is truncated or corrupt, save the adapter again") from None
    raise CopeError(f"{folder}: no adapter_model.safetensors; give a folder saved by peft's save_pretrained")


def read_peft_lora(peft_dir: str | os.PathLike) -> PeftLora:
    folder = Path(peft_dir)
    if not folder.is_dir():
        raise CopeError(f"{folder}: not a folder; give the peft adapter folder (with adapter_config.json)")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise CopeError(f"{folder}: no adapter_config.json; give a folder saved by peft's save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise CopeError(f"{cfg_path}: not valid JSON ({exc}); save the adapter again") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CopeError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA adapters can be exported for llama.cpp")
    if config.get("use_dora"):
        raise CopeError(f"{cfg_path}: DoRA adapters cannot be applied by llama.cpp; retrain with use_dora=False")
    if config.get("lora_bias"):
        raise CopeError(f"{cfg_path}: LoRA with bias (lora_bias=True) cannot be applied by llama.cpp; retrain with lora_bias=False")
    if config.get("fan_in_fan_out"):
        raise CopeError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported; use a llama, qwen2 or gemma3 model")
    if config.get("modules_to_save"):
        raise CopeError(f"{cfg_path}: modules_to_save={config['modules_to_save']} stores full weights, which a llama.cpp LoRA cannot carry; "
                        f"retrain without modules_to_save, or merge it with `cope convert base --merge-adapter`")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    bad = [t for t in targets if any(t == e or t.endswith("." + e) for e in EMBEDDING_MODULES)]
    if bad:
        raise CopeError(f"{cfg_path}: LoRA on {', '.join(bad)} (embeddings / lm_head) cannot be exported as a llama.cpp LoRA; "
                        f"retrain with target_modules on attention/MLP projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    tensors = _load_tensors(folder)
    for key in tensors:  # embeddings first: peft also saves their full weights, which would hide the cause
        parts = set(key.split("."))
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts or parts & set(EMBEDDING_MODULES):
            raise CopeError(f"{folder}: holds LoRA or full weights for the embeddings / lm_head ({key}); llama.cpp cannot apply them "
                            f"as a LoRA, retrain without embed_tokens / lm_head in target_modules")
    pairs: dict = {}
    for key, arr in tensors.items():
        m = _LORA_KEY.match(key)
        if not m:
            if "lora_magnitude_vector" in key:
                raise CopeError(f"{folder}: holds DoRA magnitudes ({key}); llama.cpp cannot apply DoRA, retrain with use_dora=False")
            raise CopeError(f"{folder}: tensor {key} is not a LoRA A/B matrix (full weights or trainable tokens); "
                            f"retrain with plain LoRA, or merge it with `cope convert base --merge-adapter`")
        module = m.group("module")
        module = module.removeprefix("base_model.model.")
        if module.split(".")[-1] in EMBEDDING_MODULES:
            raise CopeError(f"{folder}: LoRA on {module} (embeddings / lm_head) cannot be exported as a llama.cpp LoRA; retrain without it in target_modules")
        if arr.ndim != 2:
            raise CopeError(f"{folder}: LoRA tensor {key} has {arr.ndim} dimensions (a conv layer?); only linear layers are supported")
        pairs.setdefault(module, {})[m.group("ab")] = arr
    if not pairs:
        raise CopeError(f"{folder}: the adapter holds no LoRA tensors; train it again")
    lora = PeftLora(folder, config)
    r_default = int(config.get("r") or 8)
    alpha_default = float(config.get("lora_alpha") or r_default)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CopeError(f"{folder}: LoRA for {module} is missing its {'B' if 'A' in ab else 'A'} matrix; the adapter file is incomplete")
        a, b = ab["A"], ab["B"]  # (r, in), (out, r)
        r = a.shape[0]
        if b.shape[1] != r:
            raise CopeError(f"{folder}: LoRA for {module} has A {list(a.shape)} and B {list(b.shape)} of different rank; the adapter file is corrupt")
        r_cfg = int(_pattern_value(config.get("rank_pattern"), module, r_default))
        if r_cfg != r:
            raise CopeError(f"{folder}: LoRA for {module} has rank {r} but adapter_config.json says {r_cfg}; the folder mixes two adapters")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha_default))
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        lora.modules[module] = (a, b, scale)
    return lora


@dataclass
class GGUFLora:
    """A LoRA in a GGUF base's layout: target tensor (e.g. blk.0.attn_q.weight) -> (A, B), one alpha."""

    alpha: float  # written as adapter.lora.alpha; llama.cpp scales each pair by alpha / r
    pairs: dict = field(default_factory=dict)  # target -> (A (r, in), B (out, r)) with llama.cpp's scale folded in
    notes: list = field(default_factory=list)


def to_gguf_layout(lora: PeftLora, base: GGUFHeader, *, permute_qk: bool = True) -> GGUFLora:
    """Map module names with TensorNameMap, check shapes against the base, permute q/k B rows.

    `permute_qk=False` exists only for the test that proves the permutation matters.
    """
    arch = base.architecture
    spec = spec_for(arch, base.path)
    n_layers = int(base.get(f"{arch}.block_count") or 0)
    n_head, n_head_kv = head_counts(base.values, arch)
    out = GGUFLora(alpha=lora.alpha)
    folded = 0
    for module, (a, b, scale) in lora.modules.items():
        target = gguf_name(arch, n_layers, module + ".weight", suffixes=(".weight",))
        if target is None:
            raise CopeError(f"{lora.folder}: LoRA module {module} has no {arch} tensor in llama.cpp; train LoRA on attention/MLP projections only")
        if target.rsplit(".", 1)[0] in EMBEDDING_TENSORS:
            raise CopeError(f"{lora.folder}: LoRA on {module} (embeddings / lm_head) cannot be exported as a llama.cpp LoRA; retrain without it in target_modules")
        if target not in base.tensors:
            raise CopeError(f"{lora.folder}: LoRA module {module} targets {target}, which the base {base.path.name} does not have; use the base the adapter was trained on")
        ne = base.tensors[target].shape  # (in, out)
        if a.shape[1] != ne[0] or b.shape[0] != ne[1]:
            raise CopeError(f"{lora.folder}: LoRA for {module} is {b.shape[0]}x{a.shape[1]} but {target} in {base.path.name} is "
                            f"{ne[1]}x{ne[0]}; the adapter was trained on another base")
        r = a.shape[0]
        llama_scale = lora.alpha / r if lora.alpha else 1.0
        b = b.astype(np.float32)
        if abs(scale / llama_scale - 1.0) > 1e-7:
            b = b * np.float32(scale / llama_scale)
            folded += 1
        if spec.permute_qk and permute_qk:
            if target.endswith(".attn_q.weight"):
                b = permute_rows(b, n_head, n_head)
            elif target.endswith(".attn_k.weight"):
                b = permute_rows(b, n_head, n_head_kv)
        out.pairs[target] = (np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32))
    if folded:
        out.notes.append(f"per-module scale folded into B for {folded} module(s) (rsLoRA or rank/alpha patterns)")
    return out
