"""Load a GGUF base into transformers, dequantized, ready to train and save.

transformers reads GGUF via `gguf_file=` (undoing llama's q/k permutation and
Gemma's norm offset) but marks the model "GGUF-quantized", after which
Trainer/trl refuse to train it and save_pretrained refuses to save it. The
weights are plain float tensors by then, so clearing the quantizer state is
all it takes. The tokenizer's add_bos comes from the GGUF (Gemma adds BOS,
SmolLM2 does not); we check transformers agrees instead of assuming it.
Offline: only the local file is read (HF_HUB_OFFLINE is set for the call).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _no_dequant_bar():
    """transformers draws its own tqdm bar while dequantizing a GGUF, ignoring its logging switches."""
    try:
        import transformers.modeling_gguf_pytorch_utils as mod
    except ImportError:
        yield
        return
    orig = getattr(mod, "tqdm", None)
    if orig is not None:
        mod.tqdm = lambda it=None, *a, **k: it
    try:
        yield
    finally:
        if orig is not None:
            mod.tqdm = orig


@contextlib.contextmanager
def _parse_gguf_once():
    """transformers parses the same GGUF three times (config, weights, tokenizer) with gguf's
    GGUFReader (~2.5 s each on the default model) and rebuilds gguf's TensorNameMap once per
    tensor (~17 ms each). Memoize both for the duration of one load: ~2x faster."""
    import gguf

    orig_reader, orig_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = orig_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = orig_reader, orig_map


def load_hf_model(base_gguf_path: str | os.PathLike, dtype=None):
    """(model, tokenizer) from a GGUF base: float weights (default float32), trainable and saveable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cope_local.errors import CopeError
    from cope_local.gguf_file import read_header

    path = Path(base_gguf_path).resolve()
    hdr = read_header(path, what="base model")
    if hdr.is_adapter:
        raise CopeError(f"{path}: is a LoRA adapter, not a base model; give the base GGUF")
    dtype = dtype or torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the per-tensor progress bar and dequantization notices
    prev_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _offline(), _no_dequant_bar(), _parse_gguf_once():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except CopeError:
        raise
    except Exception as exc:
        raise CopeError(f"{path}: transformers could not load this GGUF ({type(exc).__name__}: {exc}); "
                        f"use a llama, qwen2 or gemma3 GGUF") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if prev_bars:
            hf_logging.enable_progress_bar()
    _clear_quantizer(model)
    model.eval()
    add_bos = hdr.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and tokenizer.bos_token_id is not None:
        ids = tokenizer("a")["input_ids"]
        if bool(ids and ids[0] == tokenizer.bos_token_id) != bool(add_bos):
            raise CopeError(f"{path}: transformers' tokenizer {'adds' if not add_bos else 'does not add'} BOS but the GGUF says "
                            f"add_bos_token={bool(add_bos)}; this transformers version mis-reads the file")
    return model, tokenizer


def _clear_quantizer(model) -> None:
    """Drop the 'GGUF-quantized' marks: the weights are already dequantized floats."""
    for m in (model, getattr(model, "base_model", None)):
        if m is None:
            continue
        if getattr(m, "hf_quantizer", None) is not None:
            m.hf_quantizer = None
        for attr in ("is_quantized", "_is_quantized_training_enabled"):
            if attr in getattr(m, "__dict__", {}):
                setattr(m, attr, False)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del cfg.quantization_config
    if getattr(cfg, "quantization_config", None) is not None:
        cfg.quantization_config = None
