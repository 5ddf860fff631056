"""Ask stock llama.cpp (llama-cpp-python's low-level API) about a file we wrote.

Used to prove an export: the written tokenizer splits text like transformers,
and a base/adapter pair loads. llama.cpp explains failures only in its log,
so the log is captured while we call it (and the previous logger restored).
Pointers are checked with `if not ptr` (a NULL ctypes pointer is falsy, not None).
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

from cope_local.errors import CopeError

_CALLBACK = None  # module-level reference: llama.cpp keeps the raw pointer
_LINES: list[str] = []


@contextlib.contextmanager
def captured_llama_log():
    """Route llama.cpp's log into a list for the duration; yield the list."""
    import llama_cpp as L

    global _CALLBACK
    if _CALLBACK is None:
        def on_log(level, text, user):
            with contextlib.suppress(Exception):
                _LINES.append(text.decode("utf-8", errors="replace"))

        _CALLBACK = L.llama_log_callback(on_log)
    prev_cb, prev_ud = L.llama_log_callback(), ctypes.c_void_p()
    try:
        L.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
    except Exception:
        prev_cb = None
    _LINES.clear()
    L.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    try:
        yield _LINES
    finally:
        if prev_cb is not None:
            L.llama_log_set(prev_cb, prev_ud)


def _last_error(lines: list[str]) -> str:
    for line in reversed(lines):
        text = line.strip()
        if text and ("error" in text.lower() or "failed" in text.lower() or "exception" in text.lower()):
            return text
    return lines[-1].strip() if lines else "no reason logged"


def llama_tokenize(gguf_path: Path, texts: list[str], add_special: bool) -> list[list[int]]:
    """Token ids from llama.cpp's own tokenizer (vocab-only load: no weights read)."""
    import llama_cpp as L

    with captured_llama_log() as log:
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        model = L.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not model:
            raise CopeError(f"{gguf_path}: llama.cpp cannot load the written tokenizer ({_last_error(log)}); this is a converter bug, please report it")
        try:
            vocab = L.llama_model_get_vocab(model)
            out = []
            for text in texts:
                data = text.encode("utf-8")
                cap = len(data) + 16
                buf = (L.llama_token * cap)()
                n = L.llama_tokenize(vocab, data, len(data), buf, cap, add_special, True)
                if n < 0:
                    raise CopeError(f"{gguf_path}: llama.cpp tokenizer overflow on a probe text; this is a converter bug, please report it")
                out.append(list(buf[:n]))
            return out
        finally:
            L.llama_model_free(model)


def try_load(base: Path, adapter: Path | None = None) -> tuple[bool, str]:
    """(ok, reason): does stock llama.cpp load `base` (and `adapter` on it)?"""
    import llama_cpp as L

    with captured_llama_log() as log:
        L.llama_backend_init()
        model = L.llama_model_load_from_file(str(base).encode(), L.llama_model_default_params())
        if not model:
            return False, f"llama.cpp refused the base: {_last_error(log)}"
        try:
            if adapter is None:
                return True, "llama.cpp loads it"
            log.clear()
            lora = L.llama_adapter_lora_init(model, str(adapter).encode())
            if not lora:
                return False, f"llama.cpp refused the adapter: {_last_error(log)}"
            L.llama_adapter_lora_free(lora)
            return True, "llama.cpp loads the adapter on this base"
        finally:
            L.llama_model_free(model)
