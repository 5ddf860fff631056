"""CoPe decoding: an expert and an amateur context over ONE model, in lockstep.

    amateur = base (+ TAM adapter)            the task model without the user
    expert  = base (+ TAM) + user adapter     the personalised model

At each step the token is chosen within the expert's head set by the user's
implicit reward log p_user - alpha * log p_amateur (see rule.py).

Fast path (`lazy_amateur`): when the head set has one token the amateur cannot
change the choice, so it is not evaluated; the tokens it missed are fed to it
in ONE batched decode the next time its logits matter. Prompt-style batches
cost far less per token than single steps, and the chosen tokens are the
naive lockstep ones (exactly so on f32/f16 bases; a quantized base may round
differently in batched kernels).
"""

from __future__ import annotations

import os
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cope_local.decode import rule
from cope_local.decode.detok import StreamDetokenizer
from cope_local.decode.llama import Context, Model, default_threads
from cope_local.decode.prompt import Message, render_chat, with_bos
from cope_local.errors import CopeError
from cope_local.gguf_file import check_adapter, check_model
from cope_local.models import resolve_model

MODES = ("cope", "user", "base")
PROTECT = ("none", "eos", "eos+punct")  # tokens the contrast leaves alone (rule.cope_scores `protected`)


def default_mode_for(adapter: Path | None) -> str:
    """The mode of a draft that names none: base without a user adapter; cope for an adapter trained
    with DPO on synthetic negatives (the paper's pipeline, whose DPO is made for the contrast); user
    for any other adapter (OPPU), which Decoder.resolve_mode replaces with the task's measured best
    (GenConfig.sft_mode from Task.sft_mode: cope on LaMP-7, README "Results")."""
    if adapter is None:
        return "base"
    from cope_local.gguf_file import read_header

    return "cope" if read_header(adapter, what="adapter").get("cope.train.dpo") is True else "user"


@dataclass
class GenConfig:
    mode: str | None = None  # "cope" | "user" | "base"; None: the adapter's default (see default_mode_for)
    sft_mode: str = "user"  # mode None with an SFT-only (OPPU) adapter: the task's measured best (Task.sft_mode)
    alpha: float = 0.3  # contrast strength; the paper uses 0.1-0.7, tasks set their own
    tau: float = 0.1  # head set: tokens with p_user >= tau * max p_user (the paper's 0.1)
    head_p: float = 0.0  # > 0: the adaptive head set instead, top tokens holding head_p of p_user (rule.nucleus_head)
    max_tokens: int = 256  # new tokens at most
    temperature: float = 0.0  # 0 = greedy, the paper's setting; > 0 samples (seeded)
    top_p: float = 0.95  # nucleus mass when sampling
    seed: int = 0  # sampling seed: same seed, same text
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    protect: str = "none"  # "none" (the paper) | "eos": end-of-turn tokens | "eos+punct": also whitespace/punctuation
    repetition_penalty: float = 1.0  # > 1: the tokens generated so far lose logit (the user's, in cope mode); 1 = off
    no_repeat_ngram: int = 0  # n > 0: no n-gram of the output twice (the user's logits in cope mode); 0 = off
    lazy_amateur: bool = True  # fast path; False is the naive lockstep reference
    ignore_eos: bool = False  # benchmarks only: always run to max_tokens


@dataclass
class Generation:
    text: str
    tokens: list[int]
    n_prompt: int
    stop_reason: str  # "eos" | "stop" | "length" | "context"
    mode: str
    steps: int = 0  # tokens chosen
    amateur_evals: int = 0  # amateur decode calls after the prompt (cope mode)
    head_sizes: list[int] = field(default_factory=list, repr=False)  # |V_head| per step (cope mode)


class Decoder:
    """Load once, draft many times. Not thread-safe: one generation at a time."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        *,
        tam: str | os.PathLike | None = None,
        adapter_scale: float = 1.0,
        tam_scale: float = 1.0,
        n_ctx: int = 2048,
        threads: int | None = None,
        gpu_layers: int | None = None,
        force: bool = False,
    ):
        self.base_path = resolve_model(model)
        self.base_info = check_model(self.base_path)
        self.adapter_path = Path(adapter) if adapter else None
        self.tam_path = Path(tam) if tam else None
        for path in (self.tam_path, self.adapter_path):
            if path is not None:
                check_adapter(path, self.base_info)
                from cope_local.binding import check_binding

                check_binding(path, self.base_path, force=force)
        # base | cope (a DPO adapter) | user (an OPPU adapter: resolve_mode puts the task's sft_mode in its place)
        self.default_mode = default_mode_for(self.adapter_path)
        self.model = Model(self.base_path, gpu_layers)
        tam_set = [(self.model.load_adapter(self.tam_path), tam_scale)] if self.tam_path else []
        user_set = [(self.model.load_adapter(self.adapter_path), adapter_scale)] if self.adapter_path else []
        self._adapter_sets = {"amateur": tam_set, "expert": tam_set + user_set}
        self.n_ctx = min(n_ctx, self.model.n_ctx_train) if self.model.n_ctx_train > 0 else n_ctx
        self.threads = threads  # None: default_threads(), looked at again before every generation
        self._contexts: dict[str, Context] = {}
        self._load_seen = (-1.0, 0)  # (monotonic time, default_threads()) of the last look at the load
        self._protected: dict[str, np.ndarray | None] = {}
        self.chat_template = self.model.chat_template()

    # -- contexts are made on first use and sized to the request (KV memory grows with need,
    #    up to n_ctx): a single-mode draft holds one small KV cache only --------------------
    def context(self, role: str, need: int = 0) -> Context:
        ctx = self._contexts.get(role)
        if ctx is not None and ctx.n_ctx < min(need, self.n_ctx):
            ctx.close()
            ctx = None
        if ctx is None:
            size = min(self.n_ctx, max(512, -(-need // 256) * 256))  # multiples of 256 tokens
            ctx = Context(self.model, size, self.threads)
            ctx.set_adapters(self._adapter_sets[role])
            self._contexts[role] = ctx
        elif self.threads is None and need:
            ctx.set_threads(self._threads_now())  # a long job (negatives, eval) follows the machine's load
        return ctx

    def _threads_now(self) -> int:
        """default_threads(), looked up at most once a second (every scoring call asks)."""
        t, n = self._load_seen
        now = time.monotonic()
        if now - t > 1.0:
            n = default_threads()
            self._load_seen = (now, n)
        return n

    @property
    def has_user_adapter(self) -> bool:
        return self.adapter_path is not None

    def protected_mask(self, kind: str) -> np.ndarray | None:
        """Bool mask (n_vocab,) of the tokens GenConfig.protect names; None for "none". Built once per kind."""
        if kind not in PROTECT:
            raise CopeError(f"protect={kind!r}: use one of {', '.join(PROTECT)}")
        if kind == "none":
            return None
        if kind not in self._protected:
            mask = np.zeros(self.model.n_vocab, dtype=bool)
            mask[list(self.model.eog_ids)] = True
            if kind == "eos+punct":
                for t in range(self.model.n_vocab):
                    text = self.model.piece(t).decode("utf-8", "ignore")
                    if text and all(c.isspace() or unicodedata.category(c).startswith("P") for c in text):
                        mask[t] = True
            self._protected[kind] = mask
        return self._protected[kind]

    # -- prompts -----------------------------------------------------------------------------
    def render(self, messages: list[Message]) -> str:
        bos = self.model.piece(self.model.bos_id, special=True).decode("utf-8", "replace") if self.model.bos_id >= 0 else ""
        eos = self.model.piece(self.model.eos_id, special=True).decode("utf-8", "replace") if self.model.eos_id >= 0 else ""
        return render_chat(messages, self.chat_template, bos_token=bos, eos_token=eos, add_bos=self.model.add_bos)

    def prompt_ids(self, prompt: str | list[Message] | list[int], *, chat: bool = True) -> list[int]:
        """A user text (wrapped as one user message), a message list, or ids -> ids with BOS as the model wants."""
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)
        if isinstance(prompt, str):
            text = self.render([{"role": "user", "content": prompt}]) if chat else prompt
        else:
            text = self.render(prompt)
        return with_bos(self.model.tokenize(text), self.model.bos_id, self.model.add_bos)

    # -- generation --------------------------------------------------------------------------
    def resolve_mode(self, mode: str | None, sft_mode: str = "user") -> str:
        """The mode named, else the adapter's default; `sft_mode` (GenConfig.sft_mode) for an OPPU adapter."""
        mode = mode or (sft_mode if self.default_mode == "user" else self.default_mode)
        if mode not in MODES:
            raise CopeError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode in ("cope", "user") and not self.has_user_adapter:
            raise CopeError(f"mode {mode!r} needs a user adapter; give --profile or --adapter, or use --mode base")
        return mode

    def stream(self, prompt, cfg: GenConfig | None = None) -> Iterator[str]:
        """Yield text pieces as they are decided; returns the Generation (StopIteration.value)."""
        cfg = cfg or GenConfig()
        ids = self.prompt_ids(prompt)
        mode = self.resolve_mode(cfg.mode, cfg.sft_mode)
        detok = StreamDetokenizer(cfg.stop)
        gen = Generation(text="", tokens=[], n_prompt=len(ids), stop_reason="length", mode=mode)
        for tok in self._tokens(ids, cfg, mode, gen):
            gen.tokens.append(tok)
            piece = detok.feed(self.model.piece(tok))
            if piece:
                yield piece
            if detok.stopped:
                gen.stop_reason = "stop"
                break
        tail = detok.flush()
        if tail:
            yield tail
        gen.text = detok.text
        return gen

    def generate(self, prompt, cfg: GenConfig | None = None, on_text=None) -> Generation:
        it = self.stream(prompt, cfg)
        while True:
            try:
                piece = next(it)
            except StopIteration as done:
                return done.value
            if on_text is not None:
                on_text(piece)

    def _tokens(self, ids: list[int], cfg: GenConfig, mode: str, gen: Generation) -> Iterator[int]:
        if len(ids) + 1 > self.n_ctx:
            raise CopeError(f"prompt is {len(ids)} tokens but the context holds {self.n_ctx}; shorten the prompt or raise --ctx")
        rng = np.random.default_rng(cfg.seed)
        eog = frozenset() if cfg.ignore_eos else self.model.eog_ids
        need = len(ids) + cfg.max_tokens
        if mode == "cope":
            steps = self._cope_steps(ids, cfg, rng, gen, need)
        else:
            steps = self._single_steps(self.context("expert" if mode == "user" else "amateur", need), ids, cfg, rng)
        budget = min(cfg.max_tokens, self.n_ctx - len(ids))
        while gen.steps < budget:  # never asks for a token past the budget: no wasted decode
            tok = next(steps)
            if tok in eog:
                gen.stop_reason = "eos"
                return
            gen.steps += 1
            yield tok
        gen.stop_reason = "length" if budget == cfg.max_tokens else "context"

    def _single_steps(self, ctx: Context, ids: list[int], cfg: GenConfig, rng) -> Iterator[int]:
        ctx.reset()
        logits = ctx.eval(ids)
        out: list[int] = []  # generated tokens (the prompt's are not penalized: copying from it is often right)
        while True:
            logits = rule.ban_repeats(rule.penalize(logits, out, cfg.repetition_penalty), out, cfg.no_repeat_ngram)
            if cfg.temperature > 0:
                tok = rule.sample_top_p(logits, cfg.temperature, cfg.top_p, rng)
            else:
                tok = int(np.argmax(logits))
            out.append(tok)
            yield tok
            logits = ctx.eval([tok])

    def _cope_steps(self, ids: list[int], cfg: GenConfig, rng, gen: Generation, need: int) -> Iterator[int]:
        """Expert every step; amateur only where the head set has 2+ tokens.

        Lazy amateur: tokens it missed wait in `pending` and go in with the next
        call as one batch. Speculation: that batch also carries a guess of the
        token about to be chosen (the user's top token, CoPe's most common
        pick), with its logits requested too. When the guess is right, the
        amateur is already one step ahead and the next multi-token head set
        costs no amateur call; when wrong, the guess is dropped from its cache.
        """
        expert, amateur = self.context("expert", need), self.context("amateur", need + 1)  # +1: a speculative token
        protected = self.protected_mask(cfg.protect)
        expert.reset()
        amateur.reset()
        user_logits = expert.eval(ids)
        lazy = cfg.lazy_amateur
        pending = list(ids)  # tokens the amateur has not seen yet
        amateur_logits = None  # amateur logits at the current position, when known
        if not lazy:
            amateur_logits, pending = amateur.eval(pending), []
        out: list[int] = []  # generated tokens
        while True:
            user_logits = rule.penalize(user_logits, out, cfg.repetition_penalty)
            user_logits = rule.ban_repeats(user_logits, out, cfg.no_repeat_ngram)  # outside the head set from here on
            head = rule.nucleus_head(user_logits, cfg.head_p) if cfg.head_p > 0 else rule.head_set(user_logits, cfg.tau)
            gen.head_sizes.append(len(head))
            guess = guess_logits = None
            if len(head) == 1:
                tok = int(head[0])  # the amateur cannot change a one-token head set
            else:
                if amateur_logits is None:
                    guess = int(np.argmax(user_logits))
                    both = amateur.decode(pending + [guess], (len(pending) - 1, len(pending)))
                    amateur_logits, guess_logits, pending = both[0], both[1], []
                    gen.amateur_evals += 1
                scores = rule.cope_scores(user_logits, amateur_logits, head, cfg.alpha, protected)
                if cfg.temperature > 0:
                    tok = int(head[rule.sample_top_p(scores, cfg.temperature, cfg.top_p, rng)])
                else:
                    tok = rule.greedy(head, scores)
            out.append(tok)
            yield tok
            user_logits = expert.eval([tok])
            if not lazy:
                amateur_logits = amateur.eval([tok])
                gen.amateur_evals += 1
            elif guess is not None and tok == guess:
                amateur_logits = guess_logits  # already one step ahead
            else:
                if guess is not None:
                    amateur.truncate(amateur.n_past - 1)  # drop the wrong guess
                amateur_logits = None
                pending.append(tok)

    # -- parallel samples (synthetic negatives) --------------------------------------------
    def sample_many(self, prompt, cfg: GenConfig, seeds: list[int]) -> list[Generation]:
        """len(seeds) independent samples of one single-context mode ("base" or "user"),
        decoded as parallel sequences: one llama_decode per step serves all of them,
        which costs little more than one sequence. Sample i draws with its own RNG
        (seeds[i]); results are deterministic for the same seeds.
        """
        mode = self.resolve_mode(cfg.mode or "base")
        if mode == "cope" or cfg.temperature <= 0:
            raise ValueError("sample_many() samples one model: mode base or user, temperature > 0")
        ids = self.prompt_ids(prompt)
        n = len(seeds)
        budget = min(cfg.max_tokens, self.n_ctx - len(ids))
        if budget <= 0:
            raise CopeError(f"prompt is {len(ids)} tokens but the context holds {self.n_ctx}; shorten the prompt or raise --ctx")
        ctx = Context(self.model, len(ids) + n * budget + 8, self.threads, n_batch=max(n, 512), n_seq=n)
        try:
            ctx.set_adapters(self._adapter_sets["expert" if mode == "user" else "amateur"])
            first = ctx.eval(ids)  # sequence 0; the others share its cells
            for seq in range(1, n):
                ctx.fork(0, seq)
            rngs = [np.random.default_rng(s) for s in seeds]
            gens = [Generation(text="", tokens=[], n_prompt=len(ids), stop_reason="length", mode=mode) for _ in seeds]
            eog = frozenset() if cfg.ignore_eos else self.model.eog_ids
            logits = {seq: first for seq in range(n)}
            live = list(range(n))
            while live:
                step = []
                for seq in live:
                    tok = rule.sample_top_p(logits[seq], cfg.temperature, cfg.top_p, rngs[seq])
                    if tok in eog:
                        gens[seq].stop_reason = "eos"
                        continue
                    gens[seq].tokens.append(tok)
                    gens[seq].steps += 1
                    if gens[seq].steps < budget:
                        step.append((seq, tok))
                    elif budget < cfg.max_tokens:
                        gens[seq].stop_reason = "context"
                live = [seq for seq, _ in step]
                if step:
                    rows = ctx.step_seqs([t for _, t in step], live, [len(ids) + gens[s].steps - 1 for s in live])
                    logits = dict(zip(live, rows))
        finally:
            ctx.close()
        for g in gens:
            detok = StreamDetokenizer(cfg.stop)
            for tok in g.tokens:
                detok.feed(self.model.piece(tok))
                if detok.stopped:
                    g.stop_reason = "stop"
                    break
            detok.flush()
            g.text = detok.text
        return gens

    # -- scoring (synthetic negatives) -----------------------------------------------------
    def token_logprobs(self, ids: list[int], start: int, role: str = "expert") -> np.ndarray:
        """log p(ids[i] | ids[:i]) for i in [start, len(ids)), under `role`'s adapters. -> (len(ids)-start,)"""
        if not 0 < start <= len(ids):
            raise ValueError("start must be in 1..len(ids)")
        ctx = self.context(role, len(ids))
        ctx.reset()
        if len(ids) > self.n_ctx:
            raise CopeError(f"sequence is {len(ids)} tokens but the context holds {self.n_ctx}")
        if start > 1:
            ctx.eval(ids[: start - 1])
        logits = ctx.eval_all_logits(ids[start - 1 : -1]).astype(np.float64)  # (n, V): predicts ids[start:]
        logz = np.logaddexp.reduce(logits, axis=1)
        targets = np.asarray(ids[start:])
        return logits[np.arange(len(targets)), targets] - logz

    def close(self) -> None:
        for ctx in self._contexts.values():
            ctx.close()
        self._contexts.clear()
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
