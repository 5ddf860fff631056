"""The trainable base: a GGUF loaded into transformers once, then cached as safetensors.

Loading a GGUF into transformers dequantizes every tensor in Python and
rebuilds the tokenizer from the GGUF vocabulary: 35-40 s for SmolLM2-135M on
2 busy cores. The dequantized float32 weights and tokenizer saved with
save_pretrained reload in ~0.5 s and are bit-identical, so every training
stage (and every test) after the first pays half a second instead.

    <cache_root()>/hf/<base fingerprint>/   config.json, model.safetensors, tokenizer.json, cope.json

cache_root() is COPE_CACHE if set, else home()/cache. Keyed on the base's
content fingerprint (cope_local.binding), so a changed file never hits a
stale copy. Costs ~4 bytes per parameter of disk (540 MB for SmolLM2-135M).
Everything here runs offline (HF_HUB_OFFLINE) and reads only local files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CACHE_FORMAT = 1  # bump when what is stored changes


def cache_root() -> Path:
    env = os.environ.get("COPE_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        from cope_local.paths import home

        root = home() / "cache"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


@contextlib.contextmanager
def quiet_renames():
    """transformers' FutureWarnings about its gradient_checkpointing renames, raised inside peft and trl
    (not our calls), silenced for the block: they filled every training log with two warnings per stage."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.*")
        yield


@contextlib.contextmanager
def offline():
    """HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set for the block: transformers never reaches a hub."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_dequant_bar():
    """transformers draws its own tqdm bar while dequantizing a GGUF, ignoring its logging switches."""
    try:
        import transformers.modeling_gguf_pytorch_utils as mod
    except ImportError:  # another transformers layout: the bar stays, nothing breaks
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


def cache_dir(base_gguf: str | os.PathLike) -> Path:
    from cope_local.binding import base_fingerprint

    return cache_root() / "hf" / base_fingerprint(base_gguf)[:24]


def _ensure_cache(base_gguf: Path):
    """-> (folder, model or None): builds the cache if missing; returns the freshly loaded model when it did."""
    folder = cache_dir(base_gguf)
    if (folder / "cope.json").exists():
        return folder, None
    from transformers.utils import logging as hf_logging

    from convert.torch_load import load_hf_model
    from cope_local.gguf_file import read_header

    print(f"preparing {base_gguf.name} for training (once; cached in {folder.parent})", file=sys.stderr)
    with _quiet_dequant_bar():
        model, tokenizer = load_hf_model(base_gguf)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bar
    add_bos = read_header(base_gguf, what="base model").get("tokenizer.ggml.add_bos_token")
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cope.json").write_text(json.dumps({"format": CACHE_FORMAT, "base": str(base_gguf),
                                                   "add_bos": add_bos}) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process built it first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # disk full, read-only cache: train anyway, uncached
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"note: could not cache the base for training ({exc.strerror or exc}); next run loads the GGUF again",
              file=sys.stderr)
        return None, (model, tokenizer)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return folder, (model, tokenizer)


def load_tokenizer(base_gguf: str | os.PathLike):
    """The HF tokenizer of a GGUF base (ids equal llama.cpp's; see tests/test_train_data.py)."""
    from transformers import AutoTokenizer

    base_gguf = Path(base_gguf).resolve()
    folder, loaded = _ensure_cache(base_gguf)
    if loaded is not None:
        return loaded[1]
    with offline():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_base(base_gguf: str | os.PathLike, dtype=None):
    """(model, tokenizer) of a GGUF base as plain float weights (default float32), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    base_gguf = Path(base_gguf).resolve()
    dtype = dtype or torch.float32
    folder, loaded = _ensure_cache(base_gguf)
    if loaded is not None:
        model, tokenizer = loaded
        return model.to(dtype), tokenizer
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bar: noise in a stage's output
    try:
        with offline():
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:  # a damaged cache: rebuild it from the GGUF
        print(f"note: training cache {folder} is unreadable ({exc}); rebuilding it", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return load_base(base_gguf, dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
