"""Every query of one user decoded by every method, each row cached in results.jsonl.

    method     adapter in the expert          decoder mode   amateur
    base       none (no TAM either)            base           -
    tam        none                            base           (base + TAM decoded alone)
    oppu       SFT adapter                     user           -
    oppu+dpo   DPO adapter                     user           -
    oppu+cd    SFT adapter                     cope           base + TAM
    cope       DPO adapter                     cope           base + TAM

One Decoder per adapter, opened only when one of its rows is missing, so a rerun that has
everything loads no model at all. Greedy decoding throughout (the paper's setting).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cope_local.eval.data import EvalUser, Query
from cope_local.eval.results import append_row, row_key, settings_key

METHODS = ("base", "tam", "oppu", "oppu+dpo", "oppu+cd", "cope")
# method -> (adapter: None | "sft" | "dpo", decoder mode, the TAM is loaded)
METHOD_SPEC = {"base": (None, "base", False), "tam": (None, "base", True), "oppu": ("sft", "user", True),
               "oppu+dpo": ("dpo", "user", True), "oppu+cd": ("sft", "cope", True), "cope": ("dpo", "cope", True)}
N_CTX = 4096  # decoder context cap: LongLaMP prompts + 600 new tokens fit; contexts are sized per request anyway


@dataclass
class Adapters:
    """What one user's generations decode with; keys are the pipeline's stage keys (content hashes)."""

    base: Path
    tam: Path | None = None  # TAM GGUF (None under --no-tam)
    tam_key: str = ""
    tam_split: str = "none"  # how this user's TAM was chosen (written into every row)
    files: dict = field(default_factory=dict)  # "sft" | "dpo" -> GGUF path
    keys: dict = field(default_factory=dict)  # "sft" | "dpo" -> stage key


@dataclass
class Decoding:
    alpha: float  # CoPe contrast weight
    tau: float  # head-set threshold
    max_tokens: int  # new tokens at most
    protect: str = "none"  # tokens the contrast leaves alone (GenConfig.protect): none | eos | eos+punct
    repetition_penalty: float = 1.0  # GenConfig.repetition_penalty, for every method (1 = off)
    no_repeat_ngram: int = 0  # GenConfig.no_repeat_ngram, for every method (0 = off)
    adapter_scale: float = 1.0  # the user adapter's weight in the expert (Decoder adapter_scale): 1 = as trained,
    #                             0 = the base; 0.5 = half its update (on LaMP-7 not a milder adapter: README)
    head_p: float = 0.0  # GenConfig.head_p: > 0 = the adaptive (nucleus) head set in place of the tau rule
    one_paragraph: bool = False  # stop at the first blank line, for every method: a base model without a chat
    #                              template (Gemma 3 270M) writes its answer, a blank line, then the answer again


# Settings a row leaves out when they are at these values, so rows made before each option existed stay valid
SETTING_DEFAULTS = {"repetition_penalty": 1.0, "no_repeat_ngram": 0, "adapter_scale": 1.0, "protect": "none",
                    "head_p": 0.0, "one_paragraph": False}


def row_settings(method: str, prompt: str, ad: Adapters, dec: Decoding) -> dict:
    """Everything a generation depends on; alpha/tau only where the mode uses them (so a sweep reuses the rest)."""
    adapter, mode, uses_tam = METHOD_SPEC[method]
    s = {"model": ad.base.name, "mode": mode, "max_tokens": dec.max_tokens, "greedy": True,
         "prompt_sha": hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16],
         "tam": ad.tam_key if (uses_tam and ad.tam) else "none", "tam_split": ad.tam_split,
         "adapter": ad.keys.get(adapter) if adapter else None}
    options = {"repetition_penalty": dec.repetition_penalty, "no_repeat_ngram": dec.no_repeat_ngram,  # every method
               "one_paragraph": dec.one_paragraph}
    if adapter:  # only rows that decode a user adapter depend on its weight
        options["adapter_scale"] = dec.adapter_scale
    if mode == "cope":
        s |= {"alpha": dec.alpha, "tau": dec.tau}
        options |= {"protect": dec.protect, "head_p": dec.head_p}
    return s | {k: v for k, v in options.items() if v != SETTING_DEFAULTS[k]}


def generate_user(user: EvalUser, queries: list[Query], methods, ad: Adapters, dec: Decoding, results: Path,
                  done: set, log=None) -> dict:
    """Decode what is missing; returns {generated, cached, decode_seconds: {method: s}, keys: {(u, q, m): key}}."""
    from cope_local.decode import Decoder, GenConfig
    from cope_local.eval.metrics import rouge, words

    log = log or (lambda m: print(f"[{user.user_id}] {m}", file=sys.stderr, flush=True))
    stats = {"generated": 0, "cached": 0, "decode_seconds": {}, "keys": {}}
    outputs: dict[tuple, str] = {}  # (query id, method) -> text made in this call (tam = base under --no-tam)
    for method in methods:
        adapter, mode, uses_tam = METHOD_SPEC[method]
        todo = []
        for q in queries:
            settings = row_settings(method, q.prompt, ad, dec)
            key = settings_key({**settings, "method": method})
            stats["keys"][(user.user_id, q.id, method)] = key
            if (user.user_id, q.id, method, key) in done:
                stats["cached"] += 1
            else:
                todo.append((q, settings, key))
        if not todo:
            continue
        t0 = time.monotonic()
        decoder = None
        try:
            for q, settings, key in todo:
                text, stop = outputs.get((q.id, "base")), "copied"
                if not (method == "tam" and ad.tam is None and text is not None):  # --no-tam: tam is base
                    if decoder is None:
                        decoder = Decoder(ad.base, ad.files[adapter] if adapter else None,
                                          tam=ad.tam if uses_tam else None, n_ctx=N_CTX,
                                          adapter_scale=dec.adapter_scale)
                    cfg = GenConfig(mode=mode, alpha=dec.alpha, tau=dec.tau, max_tokens=dec.max_tokens, temperature=0.0,
                                    protect=dec.protect, repetition_penalty=dec.repetition_penalty,
                                    no_repeat_ngram=dec.no_repeat_ngram, head_p=dec.head_p,
                                    stop=("\n\n",) if dec.one_paragraph else ())
                    gen = decoder.generate(q.prompt, cfg)
                    text, stop = gen.text.strip(), gen.stop_reason
                outputs[(q.id, method)] = text
                scores = rouge(text, q.reference)
                row = {"user_id": user.user_id, "query_id": q.id, "query_kind": q.kind, "method": method, "key": key,
                       "prompt": q.prompt, "output": text, "reference": q.reference, "settings": settings,
                       "rouge1": round(scores["rouge1"], 6), "rougeL": round(scores["rougeL"], 6),
                       "words": words(text), "stop_reason": stop}
                append_row(results, row)
                done.add(row_key(row))
                stats["generated"] += 1
        finally:
            if decoder is not None:
                decoder.close()
        stats["decode_seconds"][method] = round(time.monotonic() - t0, 2)
        log(f"{method}: {len(todo)} generated in {stats['decode_seconds'][method]:.1f} s")
    return stats
