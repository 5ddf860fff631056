"""The decoder behind the TUI: loaded in a worker thread, one stream at a time, stoppable.

llama.cpp runs through ctypes, which releases the GIL, so a thread worker keeps the
UI responsive while it loads or drafts. The Decoder is not thread-safe: a lock makes
loads and streams take turns. Stopping is a flag checked between tokens; the stream
is a plain generator, so closing it is all the cleanup there is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cope_local.decode import Decoder, GenConfig
from cope_local.errors import CopeError


@dataclass(frozen=True)
class Sources:
    model: str | None = None  # base model name or .gguf path; None = the default model
    adapter: str | None = None  # the user's LoRA (.gguf); None = base model only
    tam: str | None = None  # the amateur's task adapter (.gguf)

    def describe(self) -> str:
        """Short, for the top bar: the adapter's file name, or the base model's name."""
        if self.adapter:
            return Path(self.adapter).name
        model = Path(self.model).stem if self.model and self.model.endswith(".gguf") else (self.model or "smollm2-135m")
        return f"{model}, no adapter"


STOP_WORDS = {"eos": "done", "stop": "done (stop string)", "length": "token limit", "context": "context full",
              "stopped": "stopped (Esc)"}


@dataclass
class Result:
    text: str
    stop_reason: str  # eos | length | stop | context | stopped (the user pressed Esc)
    mode: str
    steps: int  # pieces (≈ tokens) received

    def summary(self) -> str:
        """'cope · 12 tokens · token limit': for a border subtitle."""
        tokens = f"{self.steps} token{'s' if self.steps != 1 else ''}"
        return f"{self.mode} · {tokens} · {STOP_WORDS.get(self.stop_reason, self.stop_reason)}"


class Engine:
    def __init__(self, *, n_ctx: int = 2048, threads: int | None = None, gpu_layers: int | None = None):
        self.n_ctx = n_ctx
        self.threads = threads
        self.gpu_layers = gpu_layers
        self._lock = threading.Lock()
        self._decoder: Decoder | None = None
        self.sources: Sources | None = None  # what the loaded decoder was made from

    @property
    def loaded(self) -> bool:
        return self._decoder is not None

    @property
    def has_adapter(self) -> bool:
        return self._decoder is not None and self._decoder.has_user_adapter

    def load(self, sources: Sources) -> bool:
        """Make the decoder for `sources` unless it is loaded already (blocking) -> whether it loaded anew."""
        with self._lock:
            if self._decoder is not None and self.sources == sources:
                return False
            self._close()
            self._decoder = Decoder(sources.model, sources.adapter, tam=sources.tam, n_ctx=self.n_ctx,
                                    threads=self.threads, gpu_layers=self.gpu_layers)
            self.sources = sources
            return True

    def stream(self, messages: list[dict], cfg: GenConfig, stop: threading.Event,
               on_piece: Callable[[str], None]) -> Result:
        """Generate into `on_piece` until done or `stop` is set; the chat is trimmed from the front to fit."""
        with self._lock:
            dec = self._decoder
            if dec is None:
                raise CopeError("the model is not loaded yet")
            mode = dec.resolve_mode(cfg.mode, cfg.sft_mode)
            messages = self.fit(messages, cfg.max_tokens)
            it = dec.stream(messages, cfg)
            text, steps = [], 0
            try:
                while True:
                    if stop.is_set():
                        return Result("".join(text), "stopped", mode, steps)
                    try:
                        piece = next(it)
                    except StopIteration as done:
                        gen = done.value
                        return Result("".join(text), gen.stop_reason if gen else "eos", mode, steps)
                    text.append(piece)
                    steps += 1
                    on_piece(piece)
            finally:
                it.close()

    def fit(self, messages: list[dict], max_tokens: int) -> list[dict]:
        """Drop the oldest turns (never the last message) until the prompt leaves room for an answer."""
        dec = self._decoder
        room = max(16, min(max_tokens, self.n_ctx // 2))
        msgs = list(messages)
        while len(msgs) > 1 and len(dec.prompt_ids(msgs)) + room > dec.n_ctx:
            msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]
        return msgs

    def _close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
            self.sources = None

    def close(self) -> None:
        with self._lock:
            self._close()
