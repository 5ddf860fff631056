"""A thin, safe layer over llama-cpp-python's low-level (ctypes) API.

Why low-level: the high-level `Llama(lora_path=)` loads a private copy of
the weights with mmap off (twice the memory for two models) and segfaults on
a bad adapter. Here ONE memory-mapped model serves several contexts; each
context gets its own set of LoRA adapters. Every null pointer becomes a
CopeError carrying llama.cpp's own log line for the reason.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import llama_cpp as C
import numpy as np

from cope_local.errors import CopeError

# --- logging: llama.cpp prints to stderr unless given a callback ------------------------
_log_lock = threading.Lock()
_log_lines: list[str] = []  # recent llama.cpp messages (warnings and errors), for error text


def _on_log(level: int, text: bytes, _user) -> None:
    if level >= 3 or not text:  # GGML_LOG_LEVEL_WARN=3, ERROR=4 (and CONT=5): keep; drop debug/info
        with _log_lock:
            _log_lines.append(text.decode("utf-8", "replace"))
            del _log_lines[:-50]


_LOG_CALLBACK = C.llama_log_callback(_on_log)  # module global: llama.cpp keeps the raw pointer
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        if os.environ.get("COPE_LLAMA_LOG") != "1":
            C.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        C.llama_backend_init()
        _backend_ready = True


def _last_log(default: str) -> str:
    with _log_lock:
        lines = [ln.strip() for ln in _log_lines if ln.strip()]
        _log_lines.clear()
    errs = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return (errs or lines or [default])[-1]


def default_gpu_layers() -> int:
    """All layers on the GPU when llama.cpp was built with Metal/CUDA/Vulkan, else none."""
    return 999 if C.llama_supports_gpu_offload() else 0


def default_threads() -> int:
    """All cores (at most 8), less those other programs are busy on right now.

    llama.cpp's threads wait for each other at every graph node; one thread
    that shares its core with another busy process stalls them all (measured
    here: 2 threads on 2 cores with one other busy process ran 50x slower than
    1 thread). COPE_THREADS overrides.
    """
    if os.environ.get("COPE_THREADS"):
        return max(1, int(os.environ["COPE_THREADS"]))
    n = max(1, min(os.cpu_count() or 1, 8))
    return max(1, n - _busy_elsewhere())


def _busy_elsewhere() -> int:
    """Runnable tasks other than this one (min of 3 quick looks at /proc/loadavg; 0 if unknown)."""
    import time

    seen = []
    for _ in range(3):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        seen.append(running - 1)  # this process is one of them
        time.sleep(0.001)
    return max(0, min(seen))


class Model:
    """A memory-mapped GGUF model: weights, vocabulary, metadata."""

    def __init__(self, path: str | os.PathLike, gpu_layers: int | None = None):
        _init_backend()
        self.path = Path(path)
        params = C.llama_model_default_params()
        params.n_gpu_layers = default_gpu_layers() if gpu_layers is None else gpu_layers
        params.load_mode = C.LLAMA_LOAD_MODE_MMAP
        ptr = C.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise CopeError(f"{self.path}: llama.cpp could not load the model ({_last_log('no reason given')})")
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_layer = C.llama_model_n_layer(ptr)
        self.n_ctx_train = C.llama_model_n_ctx_train(ptr)
        self.bos_id = C.llama_vocab_bos(self.vocab)
        self.eos_id = C.llama_vocab_eos(self.vocab)
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self.vocab, t))
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        self.adapters: list[LoraAdapter] = []

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        ptr = C.llama_model_chat_template(self.ptr, None)
        return ptr.decode("utf-8") if ptr else None

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Text -> ids, parsing special tokens (<|im_start|>) when `special`. Never adds BOS."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token (control tokens render as b"" unless `special`)."""
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is None:
            n = C.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.vocab, token, big, len(big), 0, special)
                cached = big.raw[:n]
            else:
                cached = self._piece_buf.raw[:n]
            self._pieces[key] = cached
        return cached

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def load_adapter(self, path: str | os.PathLike) -> LoraAdapter:
        adapter = LoraAdapter(self, path)
        self.adapters.append(adapter)
        return adapter

    def close(self) -> None:
        if getattr(self, "ptr", None):
            C.llama_model_free(self.ptr)  # frees its adapters too
            self.ptr = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the ctypes module may already be gone
            pass


class LoraAdapter:
    def __init__(self, model: Model, path: str | os.PathLike):
        self.path = Path(path)
        ptr = C.llama_adapter_lora_init(model.ptr, str(self.path).encode())
        if not ptr:
            raise CopeError(f"{self.path}: llama.cpp refused the adapter ({_last_log('no reason given')}); use an adapter exported for this base")
        self.ptr = ptr


class Context:
    """One KV cache and its adapters over a shared Model: eval/decode append to sequence 0;
    fork and step_seqs serve n_seq parallel sequences (sampled negatives)."""

    def __init__(self, model: Model, n_ctx: int, threads: int | None = None, n_batch: int = 512, n_seq: int = 1):
        self._batch = None  # one llama_batch, reused by every decode()
        self.model = model
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.kv_unified = n_seq > 1  # parallel samples share their prompt's cells (seq_cp is free)
        threads = threads or default_threads()
        self.threads = threads
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED  # same kernels everywhere: comparable logits
        params.no_perf = True
        ptr = C.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise CopeError(f"{model.path}: llama.cpp could not create a context of {n_ctx} tokens ({_last_log('out of memory?')})")
        self.ptr = ptr
        self.n_ctx = C.llama_n_ctx(ptr)
        self.n_batch = n_batch
        self.n_past = 0
        self.n_vocab = model.n_vocab

    def set_threads(self, threads: int) -> None:
        """Change the thread count for the next decodes (cheap: the thread pool follows)."""
        if threads != self.threads:
            C.llama_set_n_threads(self.ptr, threads, threads)
            self.threads = threads

    def set_adapters(self, adapters: list[tuple[LoraAdapter, float]]) -> None:
        n = len(adapters)
        arr = (C.llama_adapter_lora_p_ctypes * max(n, 1))(*[a.ptr for a, _ in adapters])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        rc = C.llama_set_adapters_lora(self.ptr, arr if n else None, n, scales if n else None)
        if rc != 0:
            raise CopeError(f"{self.model.path}: llama.cpp could not apply the adapters ({_last_log(f'code {rc}')})")

    def reset(self) -> None:
        C.llama_memory_clear(C.llama_get_memory(self.ptr), True)
        self.n_past = 0

    def truncate(self, n_past: int) -> None:
        """Forget every token from position `n_past` on (undo a speculative token)."""
        C.llama_memory_seq_rm(C.llama_get_memory(self.ptr), 0, n_past, -1)
        self.n_past = n_past

    def fork(self, src: int, dst: int) -> None:
        """Sequence `dst` shares everything `src` holds so far (unified KV cache: no copy)."""
        C.llama_memory_seq_cp(C.llama_get_memory(self.ptr), src, dst, -1, -1)

    def step_seqs(self, tokens: list[int], seqs: list[int], positions: list[int]) -> np.ndarray:
        """One token for each of several sequences, in one decode. -> (len(tokens), n_vocab) float32"""
        batch = self._llama_batch()
        batch.n_tokens = len(tokens)
        for i, (tok, seq, pos) in enumerate(zip(tokens, seqs, positions)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, 1
            batch.seq_id[i][0] = seq
        self._run(batch, "the context is full?")
        return np.stack([np.ctypeslib.as_array(C.llama_get_logits_ith(self.ptr, i), shape=(self.n_vocab,)) for i in range(len(tokens))])

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Append tokens; return the logits after the last one. -> (n_vocab,) float32"""
        return self.decode(tokens, (len(tokens) - 1,))[0]

    def eval_all_logits(self, tokens: list[int]) -> np.ndarray:
        """Append tokens; return the logits after EVERY one of them. -> (len(tokens), n_vocab) float32"""
        return self.decode(tokens, range(len(tokens)))

    def decode(self, tokens: list[int], outputs) -> np.ndarray:
        """Append tokens to the cache in n_batch chunks; return the logits after tokens[i]
        for each i in `outputs` (ascending). -> (len(outputs), n_vocab) float32 copy"""
        if not tokens:
            raise ValueError("decode() needs at least one token")
        if self.n_past + len(tokens) > self.n_ctx:
            raise CopeError(f"context overflow: {self.n_past + len(tokens)} tokens do not fit in n_ctx={self.n_ctx}; shorten the prompt or raise --ctx")
        batch, want = self._llama_batch(), list(outputs)
        out = np.empty((len(want), self.n_vocab), dtype=np.float32)
        k = 0  # next output to fill
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            first = k
            while k < len(want) and want[k] < start + len(chunk):
                batch.logits[want[k] - start] = 1
                k += 1
            self._run(batch, "no reason given")
            self.n_past += len(chunk)
            for j in range(first, k):
                ptr = C.llama_get_logits_ith(self.ptr, want[j] - start)
                out[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def _llama_batch(self):
        """The context's one llama_batch (n_batch tokens, one sequence id each), made on first use."""
        if self._batch is None:
            self._batch = C.llama_batch_init(self.n_batch, 0, 1)
        return self._batch

    def _run(self, batch, why: str) -> None:
        """llama_decode(batch); a failure is a CopeError quoting llama.cpp's last log line (else `why`)."""
        rc = C.llama_decode(self.ptr, batch)
        if rc != 0:
            raise CopeError(f"{self.model.path}: llama_decode failed with code {rc} ({_last_log(why)})")

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ptr", None):
            C.llama_free(self.ptr)
            self.ptr = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the ctypes module may already be gone
            pass
