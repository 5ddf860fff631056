"""Base model -> GGUF: from a GGUF (re-encode, optionally merge a LoRA) or a transformers folder.

From a GGUF (the fast path, no torch unless --merge-adapter): every key/value
(tokenizer, chat template, hyper-parameters) is copied as stored and each
tensor is dequantized with gguf.quants and re-encoded (f32 / f16 / q8_0). A
merge adds B @ A * alpha/r in GGUF layout (B rows permuted for llama q/k),
which equals merging in transformers and converting back, without the 15 s
transformers load. A plain re-encoding records `cope.source.fingerprint`
(adapters made for the original then accept it); a merge is a new model and
records `cope.merge.*` instead.

From a transformers folder (config.json + safetensors + tokenizer files):
hyper-parameters from config.json, tensors renamed with gguf's TensorNameMap,
llama q/k rows permuted, Gemma norms +1, tied lm_head dropped, tokenizer
written by convert.vocab and proven equal to transformers' on probe strings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.arch import gguf_name, permute_rows, spec_for, spec_for_hf
from convert.gguf_io import OUTTYPES, PlannedTensor, TensorSource, copy_kv, decode_raw, out_qtype, write_gguf
from convert.lora import read_peft_lora, to_gguf_layout
from cope_local.binding import KEY_SOURCE_FP, KEY_SOURCE_NAME, fingerprint_info
from cope_local.errors import CopeError
from cope_local.gguf_file import read_header

_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


@dataclass
class BaseExport:
    path: Path
    architecture: str
    source_kind: str  # "gguf" or "transformers"
    merged: bool
    n_tensors: int
    bytes: int
    seconds: float
    notes: list = field(default_factory=list)


def export_base(source: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f32",
                merge_adapter: str | os.PathLike | None = None, name: str | None = None,
                tokenizer_from: str | os.PathLike | None = None) -> BaseExport:
    """Write a base GGUF at `out` (atomically) from a GGUF file or a transformers folder.

    tokenizer_from (folder sources only): copy the tokenizer.* metadata of this GGUF instead of
    rebuilding it (for a folder that came from that GGUF); still verified against transformers.
    """
    t0 = time.perf_counter()
    if outtype not in OUTTYPES:
        raise CopeError(f"unknown --outtype {outtype!r}; use one of: {', '.join(OUTTYPES)}")
    source = Path(source)
    if not source.exists():
        raise CopeError(f"{source}: no such file or folder; give a .gguf file or a transformers model folder")
    if Path(out).resolve() == source.resolve():
        raise CopeError(f"{out}: is the source itself; write to another file")
    if source.is_dir():
        result = _from_hf_folder(source, Path(out), outtype, merge_adapter, name, tokenizer_from)
    elif tokenizer_from is not None:
        raise CopeError(f"{source}: --tokenizer-from applies to transformers folders; a GGUF source keeps its own tokenizer")
    else:
        result = _from_gguf(source, Path(out), outtype, merge_adapter, name)
    result.seconds = time.perf_counter() - t0
    result.bytes = result.path.stat().st_size
    return result


# --- GGUF -> GGUF -----------------------------------------------------------------------------

def _adapter_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for fname in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = folder / fname
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _from_gguf(src: Path, out: Path, outtype: str, merge: str | os.PathLike | None, name: str | None) -> BaseExport:
    hdr = read_header(src, what="base model")
    if hdr.is_adapter:
        raise CopeError(f"{src}: is a LoRA adapter, not a base model; merge it into a base with `cope convert base BASE.gguf --merge-adapter PEFT_DIR`")
    spec_for(hdr.architecture, src)
    info = fingerprint_info(src)
    layout = None
    if merge is not None:
        layout = to_gguf_layout(read_peft_lora(merge), hdr)

    def skip(key: str) -> bool:
        return key in ("general.file_type", "general.quantization_version") or key.startswith("cope.") or (name is not None and key == "general.name")

    def kv(w) -> None:
        copy_kv(w, hdr, skip=skip)
        if name is not None:
            w.add_name(name)
        w.add_file_type(_FILE_TYPE[outtype])
        w.add_quantization_version(2)
        if layout is None:
            # a re-encoding of the same model: adapters bound to the original (root) accept it
            w.add_string(KEY_SOURCE_FP, info["source"] or info["fingerprint"])
            w.add_string(KEY_SOURCE_NAME, info["name"])
        else:
            w.add_string("cope.merge.base_fingerprint", info["fingerprint"])
            w.add_string("cope.merge.base_name", info["name"])
            w.add_string("cope.merge.adapter", Path(merge).resolve().name)
            w.add_string("cope.merge.adapter_sha256", _adapter_digest(Path(merge)))
            w.add_float32("cope.merge.alpha", float(layout.alpha))

    reader = TensorSource(hdr)
    try:
        planned = []
        for tname, t in hdr.tensors.items():
            shape = tuple(reversed(t.shape))
            planned.append(PlannedTensor(tname, shape, out_qtype(shape, outtype, tname), _producer(reader, tname, layout)))
        path = write_gguf(out, hdr.architecture, kv, planned, check=lambda tmp: read_header(tmp, what="base model"),
                          mode=0o600 if layout is not None else 0o644)  # a merged LoRA carries what it learned from private text
    finally:
        reader.close()
    notes = [f"merged {len(layout.pairs)} LoRA pairs"] + layout.notes if layout else []
    return BaseExport(path, hdr.architecture, "gguf", layout is not None, len(planned), 0, 0.0, notes)


def _producer(reader: TensorSource, tname: str, layout):
    def produce() -> np.ndarray:
        w = reader.f32(tname)  # (out, in)
        if layout is not None and tname in layout.pairs:
            a, b = layout.pairs[tname]  # (r, in), (out, r); llama.cpp's scale is alpha / r
            scale = layout.alpha / a.shape[0] if layout.alpha else 1.0
            w = w + np.float32(scale) * (b @ a)
        return w
    return produce


# --- transformers folder -> GGUF ------------------------------------------------------------

def _hf_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CopeError(f"{folder}: no config.json; give a folder saved by transformers' save_pretrained (or a .gguf file)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise CopeError(f"{cfg_path}: not valid JSON ({exc}); save the model again") from None
    if cfg.get("model_type") == "gemma3" and "text_config" in cfg:  # multimodal wrapper: the text model
        text = dict(cfg["text_config"])
        text.setdefault("model_type", "gemma3_text")
        text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
        cfg = text
    return cfg


def _open_safetensors(folder: Path) -> dict:
    """name -> (file, shape) for every tensor, without loading any."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")):
            raise CopeError(f"{folder}: only pickle .bin weights; re-save with save_pretrained(safe_serialization=True) to get safetensors")
        raise CopeError(f"{folder}: no *.safetensors weights; give a folder saved by transformers' save_pretrained")
    index = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    index[k] = (f, tuple(st.get_slice(k).get_shape()))
        except Exception as exc:
            raise CopeError(f"{f}: unreadable safetensors ({type(exc).__name__}: {exc}); the file is truncated or corrupt, save the model again") from None
    return index


def _rope(cfg: dict) -> dict:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rp = dict(rp.get("full_attention", rp)) if isinstance(rp, dict) else {}
    if "rope_theta" not in rp and cfg.get("rope_theta") is not None:
        rp["rope_theta"] = cfg["rope_theta"]
    return rp


def _hparams_kv(w, cfg: dict, arch: str, n_layers: int, head_dim: int) -> None:
    import gguf

    w.add_block_count(n_layers)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta") or (1_000_000.0 if arch == "gemma3" else 10_000.0)))
    rtype = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype not in ("default", "llama3"):
        raise CopeError(f"rope scaling {rtype!r} is not supported by this converter; export from the model's original GGUF instead")
    if cfg.get("head_dim") is not None or arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        rp_all = cfg.get("rope_parameters") or {}
        local = (rp_all.get("sliding_attention") or {}).get("rope_theta") if isinstance(rp_all, dict) else None
        local = local or cfg.get("rope_local_base_freq")
        if local:
            w.add_rope_freq_base_swa(float(local))
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        if cfg.get("attn_logit_softcapping"):
            raise CopeError("gemma3 with attn_logit_softcapping is not supported by llama.cpp")
        if cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))


def _llama3_rope_factors(cfg: dict, head_dim: int) -> np.ndarray | None:
    rope = _rope(cfg)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)
_SKIP_PARTS = ("vision_tower", "multi_modal_projector", "vision_model")


def _from_hf_folder(folder: Path, out: Path, outtype: str, merge, name: str | None, tokenizer_from=None) -> BaseExport:
    from safetensors import safe_open

    from convert.vocab import find_pre, is_byte_level, load_tokenizer, verify_tokenizer, write_vocab

    cfg = _hf_config(folder)
    spec = spec_for_hf(str(cfg.get("model_type")), folder)
    arch = spec.gguf_arch
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    tied = bool(cfg.get("tie_word_embeddings", arch == "gemma3"))
    index = _open_safetensors(folder)
    lora = read_peft_lora(merge) if merge is not None else None
    merge_modules = dict(lora.modules) if lora else {}

    planned, handles = [], {}

    def load(fname: Path, key: str) -> np.ndarray:
        if fname not in handles:
            handles[fname] = safe_open(str(fname), framework="pt")
        return handles[fname].get_tensor(key).float().numpy()

    for hf_name, (fname, shape) in index.items():
        if hf_name.endswith(_SKIP_SUFFIXES) or any(p in hf_name for p in _SKIP_PARTS):
            continue
        target = gguf_name(arch, n_layers, hf_name)
        if target is None:
            raise CopeError(f"{fname}: tensor {hf_name} has no {arch} name in llama.cpp; this checkpoint has layers llama.cpp does not run")
        if target == "output.weight" and tied:
            continue
        module = hf_name[:-len(".weight")] if hf_name.endswith(".weight") else None
        merge_ab = merge_modules.pop(module, None) if module else None

        def produce(fname=fname, hf_name=hf_name, target=target, merge_ab=merge_ab) -> np.ndarray:
            w = load(fname, hf_name)
            if merge_ab is not None:
                a, b, scale = merge_ab
                w = w + np.float32(scale) * (b @ a)  # HF layout: before the rotary permutation
            if spec.permute_qk and target.startswith("blk.") and (".attn_q." in target or ".attn_k." in target):
                w = permute_rows(w, n_head, n_head if ".attn_q." in target else n_head_kv)
            if spec.norm_shift and target.endswith("norm.weight"):
                w = w + np.float32(spec.norm_shift)
            return w

        planned.append(PlannedTensor(target, shape, out_qtype(shape, outtype, target), produce))
    if merge_modules:
        raise CopeError(f"{merge}: LoRA modules {sorted(merge_modules)[:3]} have no weight in {folder}; the adapter was trained on another model")
    factors = _llama3_rope_factors(cfg, head_dim) if arch == "llama" else None
    if factors is not None:
        planned.insert(0, PlannedTensor("rope_freqs.weight", factors.shape, out_qtype(factors.shape, "f32"), lambda: factors))
    if "token_embd.weight" not in {t.name for t in planned}:
        raise CopeError(f"{folder}: no embedding tensor (model.embed_tokens.weight); the checkpoint is incomplete")
    vocab_size = int(cfg.get("vocab_size") or next(t.shape[0] for t in planned if t.name == "token_embd.weight"))
    tok = load_tokenizer(folder)
    state = {}
    tok_src = read_header(tokenizer_from, what="tokenizer source") if tokenizer_from is not None else None
    if tok_src is not None:
        n_tok = len(decode_raw(*tok_src.raw["tokenizer.ggml.tokens"])[0]) if "tokenizer.ggml.tokens" in tok_src.raw else 0
        if n_tok != vocab_size:
            raise CopeError(f"{tokenizer_from}: has {n_tok} tokens but {folder} has {vocab_size} embedding rows; give the GGUF this model came from")

    def header_kv(w, pre) -> None:
        w.add_name(name or str(cfg.get("_name_or_path") or folder.name))
        _hparams_kv(w, cfg, arch, n_layers, head_dim)
        w.add_file_type(_FILE_TYPE[outtype])
        w.add_quantization_version(2)
        if tok_src is not None:
            copy_kv(w, tok_src, skip=lambda k: not k.startswith("tokenizer."))
            state.update({"tokenizer": tok, "kind": f"copied from {Path(tokenizer_from).name}"})
        else:
            state.update(write_vocab(w, folder, arch, vocab_size, pre=pre, tok=tok))

    pre = None
    if tok_src is None and is_byte_level(folder):
        def probe_file(cand: str) -> Path:  # vocab-only GGUF (no tensors) for llama.cpp to tokenize with
            probe = out.parent / f".{out.name}.vocab-{cand}.gguf"
            return write_gguf(probe, arch, lambda w: header_kv(w, cand), [])
        pre = find_pre(tok, folder, probe_file)

    def kv(w) -> None:
        header_kv(w, pre)
        if lora is not None:
            w.add_string("cope.merge.adapter", Path(merge).resolve().name)
            w.add_string("cope.merge.adapter_sha256", _adapter_digest(Path(merge)))

    def check(tmp: Path) -> None:
        read_header(tmp, what="base model")
        verify_tokenizer(tmp, state["tokenizer"], folder)

    try:
        path = write_gguf(out, arch, kv, planned, check=check, mode=0o600 if lora is not None else 0o644)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    notes = [f"tokenizer: {state.get('kind')}, verified against transformers"]
    if lora is not None:
        notes.append(f"merged {len(lora.modules)} LoRA modules")
    return BaseExport(path, arch, "transformers", lora is not None, len(planned), 0, 0.0, notes)
