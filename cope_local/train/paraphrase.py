"""The `generate` function tasks use to make missing inputs, backed by the llama.cpp decoder, with a cache.

`Task.make_inputs(items, generate)` asks the base model for a neutral
paraphrase of each text that has no input (rewrite, LaMP-7). Each answer is
appended (fsynced) to a cache file keyed by the prompt and the base, so an
interrupted `inputs` stage resumes where it stopped instead of starting over.
The decoder is loaded on the first call only: tasks that need no paraphrases
never load a model. An answer that starts to loop on a sentence is stopped
there: the cleaning (`tasks.until_repeat`) keeps nothing after it anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

PARAPHRASE_MAX_TOKENS = 96  # a paraphrase is about as long as the text; LaMP-7 tweets are ~30 tokens


class Paraphraser:
    def __init__(self, base: Path, cache_path: Path, total: int = 0, progress: bool = True):
        self.base, self.cache_path, self.total, self.progress = Path(base), Path(cache_path), total, progress
        self.done = 0
        self.decoder = None
        self.t0 = time.monotonic()
        self.cache: dict[str, str] = {}
        if self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.cache[row["key"]] = row["text"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill: that one paraphrase is made again

    def key(self, prompt: str | list[dict]) -> str:
        from cope_local.binding import base_fingerprint

        text = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256((base_fingerprint(self.base) + "\x00" + text).encode()).hexdigest()[:24]

    @staticmethod
    def gen_config():
        """Greedy, one paragraph, at most PARAPHRASE_MAX_TOKENS (before a loop stops it)."""
        from cope_local.decode import GenConfig

        return GenConfig(mode="base", max_tokens=PARAPHRASE_MAX_TOKENS, temperature=0.0, stop=("\n\n",))

    def __call__(self, prompt: str | list[dict]) -> str:
        """The base model's greedy answer to `prompt` (a user message, or chat messages)."""
        key = self.key(prompt)
        text = self.cache.get(key)
        if text is None:
            if self.decoder is None:
                from cope_local.decode import Decoder

                self.decoder = Decoder(self.base, n_ctx=1024)
            from cope_local.tasks.registry import loops

            text = ""
            for piece in self.decoder.stream(prompt, self.gen_config()):  # the cleaning cuts a loop: stop there
                text += piece
                if loops(text):
                    break
            self.cache[key] = text
            fd = os.open(self.cache_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.done += 1
        if self.progress and self.total and (self.done % max(1, self.total // 10) == 0 or self.done == self.total):
            rate = self.done / max(1e-9, time.monotonic() - self.t0)
            print(f"inputs: {self.done}/{self.total} inputs generated ({rate:.1f}/s)", file=sys.stderr, flush=True)
        return text

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        return False
