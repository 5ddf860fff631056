"""Synthetic negatives: K amateur samples per history item; the lowest implicit reward is the rejected text.

CoPe's DPO needs, for each thing the user wrote, a text the user would NOT
have written. As in the paper, K candidates are sampled from the amateur
(base + TAM, the user adapter off; T 1.0, top-p 0.95) and each is scored by
the user's implicit reward

    r(y) = mean log p_expert(y | x) - mean log p_amateur(y | x)

(expert = TAM + user adapter); the lowest-reward candidate is kept. Sampling
and scoring both run in llama.cpp (one mmapped model, two contexts), ~7x
faster than transformers here; no torch in this module.

Length: candidates stop at neg_max_tokens and at neg_length_ratio x the real
text's length + 8 tokens (the paper has no such cap). The base model happily
writes 100+ tokens where the user wrote 30; such a pair teaches DPO mostly
"be short", and sampling and scoring it costs three times as much.

What the mean runs over: the completion tokens, i.e. the sampled text plus the
turn-end token where the amateur ended its turn (a text cut at neg_max_tokens
gets none, the rule data.py applies to cut targets), exactly the ids DPO later
trains on as `rejected`. The
paper's code also averages over the prompt tokens. Within one item the prompt
part of the sum is the same for every candidate (causal model), so it only
enters through the denominator (P + C_k) / (n_p + n_k): a length bias whose
direction depends on how much the user adapter happens to like the prompt,
not on the candidate. We rank by the completion mean (the per-token DPO
implicit reward) and save the prompt's sums too, so the paper's score can be
recomputed; `cfg.neg_reward_prompt = True` ranks by the paper's score.

Output rows (JSONL, 0600, one per pair, in the pairs' order) hold every
candidate with its sums and reward, the chosen text's reward (a diagnostic:
how far the real text already beats the negatives), and the kept negative.
Resumable: each finished item is appended (fsynced) to `<out>.partial`; a
rerun keeps the rows whose inputs fingerprint matches and does the rest; the
partial file is renamed to `out` at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from cope_local.errors import CopeError
from cope_local.paths import atomic_path, atomic_write_text
from cope_local.train.config import TrainConfig

FORMAT = 4  # row layout, sampling and scoring version: part of the fingerprint


# -- inputs --------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike, *, what: str = "file") -> list[dict]:
    """Rows of a JSONL file; a broken line is a CopeError naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CopeError(f"{path}: {what} not found; run the earlier training stage first") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CopeError(f"{path}:{n}: not valid JSON ({exc.msg}); delete the file and rerun the stage") from None
        if not isinstance(row, dict):
            raise CopeError(f"{path}:{n}: expected a JSON object per line; delete the file and rerun the stage")
        rows.append(row)
    return rows


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """(prompt, target) pairs: `id`, and `messages` + `target` or `prompt_ids` + `target_ids`."""
    rows = read_jsonl(path, what="pairs file")
    if not rows:
        raise CopeError(f"{path}: no training pairs; add history to the profile and rerun")
    seen = set()
    for n, row in enumerate(rows, 1):
        if "id" not in row:
            raise CopeError(f"{path}: row {n} has no 'id'; rebuild the pairs file")
        if str(row["id"]) in seen:
            raise CopeError(f"{path}: id {row['id']!r} appears twice; rebuild the pairs file")
        seen.add(str(row["id"]))
        has_text = "messages" in row and "target" in row
        has_ids = "prompt_ids" in row and "target_ids" in row
        if not (has_text or has_ids):
            raise CopeError(f"{path}: row {n} needs 'messages' and 'target' (or 'prompt_ids' and 'target_ids')")
    return rows


def preference_indexes(n_pairs: int, cfg: TrainConfig) -> range:
    """Which pairs get a negative and a DPO step: all, or the newest cfg.dpo_max_pairs (the pairs file's end)."""
    if cfg.dpo_max_pairs < 0:
        raise CopeError(f"dpo_max_pairs is {cfg.dpo_max_pairs}; it must be 0 (all pairs) or a positive count")
    return range(max(0, n_pairs - cfg.dpo_max_pairs) if cfg.dpo_max_pairs else 0, n_pairs)


def encode_pair(dec, row: dict, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(prompt_ids, chosen_ids) exactly as SFT saw them and drafting builds them (cope_local.train.data)."""
    from cope_local.train.data import encode_row

    return encode_row(row, dec.model, dec.chat_template, cfg)


# -- scoring ---------------------------------------------------------------------------------------
def _logprobs(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """log softmax(logits)[i, targets[i]]. (n, V), (n,) -> (n,) float64"""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(len(targets)), targets] - logz


class PromptScorer:
    """Log-prob sums of completions after one prompt, expert and amateur, the prompt evaluated once per role.

    Each context keeps prompt[:-1] in its KV cache; a completion is scored by
    cutting the cache back to it and evaluating [prompt[-1]] + completion[:-1]
    in one batch. The batches are the ones `Decoder.token_logprobs(ids,
    len(prompt))` uses, so the numbers equal it exactly (on a Q4 base llama.cpp
    rounds differently when the same tokens come in other batches, by up to
    ~0.2 nats on a token); evaluating the prompt once instead of 2(K+1) times
    makes scoring ~2x faster on short prompts, more on long ones.
    """

    ROLES = ("expert", "amateur")

    def __init__(self, dec, prompt_ids: list[int]):
        if len(prompt_ids) < 2:
            raise CopeError("a training prompt has fewer than 2 tokens; rebuild the pairs file")
        self.dec, self.prompt = dec, list(prompt_ids)
        self.prompt_sums = {}
        for role in self.ROLES:
            ctx = dec.context(role, dec.n_ctx)  # full size: prompt + the longest completion
            ctx.reset()
            logits = ctx.eval_all_logits(self.prompt[:-1])  # (n_p-1, V): predicts prompt[1:]
            self.prompt_sums[role] = float(_logprobs(logits, self.prompt[1:]).sum())

    def score(self, completion: list[int]) -> dict:
        """{expert_sum, amateur_sum, n}: log p(completion | prompt) summed, under each role."""
        out = {}
        for role in self.ROLES:
            ctx = self.dec.context(role, self.dec.n_ctx)
            ctx.truncate(len(self.prompt) - 1)
            logits = ctx.eval_all_logits(self.prompt[-1:] + completion[:-1])  # (n, V): predicts completion
            out[f"{role}_sum"] = float(_logprobs(logits, completion).sum())
        out["n"] = len(completion)
        return out


def reward(s: dict, *, with_prompt: bool = False) -> float:
    """Implicit reward of one scored completion: mean log p_expert - mean log p_amateur."""
    if with_prompt:  # the paper's code: the mean runs over prompt and completion tokens
        n = s["n"] + s["n_prompt_scored"]
        return (s["expert_sum"] + s["expert_prompt_sum"] - s["amateur_sum"] - s["amateur_prompt_sum"]) / n
    return (s["expert_sum"] - s["amateur_sum"]) / s["n"]


def pair_digest(row: dict) -> str:
    """Hash of what a pair contributes to training: a changed text invalidates its negatives row."""
    keep = {k: row.get(k) for k in ("messages", "target", "prompt_ids", "target_ids")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def sample_seed(seed: int, index: int, k: int) -> int:
    """Sampling seed of candidate k of item `index`: independent streams, stable across resumes."""
    return int(np.random.SeedSequence([seed, index, k]).generate_state(1)[0])


def _file_sha(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(base_gguf, user_adapter_gguf, tam_gguf, cfg: TrainConfig) -> str:
    """What a row depends on besides its pair: models and sampling settings."""
    from cope_local.binding import base_fingerprint

    data = {
        "format": FORMAT,
        "base": base_fingerprint(base_gguf),
        "user": _file_sha(user_adapter_gguf),
        "tam": _file_sha(tam_gguf),
        "k": cfg.neg_samples,
        "temperature": cfg.neg_temperature,
        "top_p": cfg.neg_top_p,
        "max_tokens": cfg.neg_max_tokens,
        "length_ratio": cfg.neg_length_ratio,
        "seed": cfg.seed,
        "with_prompt": cfg.neg_reward_prompt,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "max_target_tokens": cfg.max_target_tokens,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def candidate_length(cfg: TrainConfig, n_chosen: int) -> int:
    """Token cap of the candidates for a real text of n_chosen tokens (cfg.neg_max_tokens, cfg.neg_length_ratio)."""
    if cfg.neg_length_ratio > 0:
        return min(cfg.neg_max_tokens, int(cfg.neg_length_ratio * n_chosen) + 8)
    return cfg.neg_max_tokens


def negatives_for_item(dec, index: int, row: dict, cfg: TrainConfig, turn_end: int) -> dict:
    """Sample K candidates for one pair, score them and the real text, keep the lowest-reward candidate."""
    from cope_local.decode import GenConfig, Generation

    prompt_ids, chosen_ids = encode_pair(dec, row, cfg)
    with_prompt = cfg.neg_reward_prompt
    samples = []
    seeds = [sample_seed(cfg.seed, index, k) for k in range(cfg.neg_samples)]
    max_tokens = candidate_length(cfg, len(chosen_ids))
    # the K candidates decode as parallel sequences: one llama.cpp call per step for all of them
    if max_tokens > 0:
        gens = dec.sample_many(prompt_ids, GenConfig(mode="base", temperature=cfg.neg_temperature, top_p=cfg.neg_top_p,
                                                     max_tokens=max_tokens), seeds)
    else:
        gens = [Generation(text="", tokens=[], n_prompt=len(prompt_ids), stop_reason="length", mode="base") for _ in seeds]
    for seed, gen in zip(seeds, gens):
        # the turn ends only where the amateur ended it; a text cut at neg_max_tokens gets no end-of-turn
        # (the rule data.py applies to cut targets: no model should learn to stop mid-sentence)
        ids = list(gen.tokens) + ([turn_end] if gen.stop_reason == "eos" else [])
        if not ids:  # nothing sampled and no end (neg_max_tokens = 0): score the bare end of turn
            ids = [turn_end]
        samples.append((seed, gen, ids))
    scorer = PromptScorer(dec, prompt_ids)  # the prompt once per role, then every completion on top of it
    prompt_part = {"expert_prompt_sum": scorer.prompt_sums["expert"], "amateur_prompt_sum": scorer.prompt_sums["amateur"],
                   "n_prompt_scored": len(prompt_ids) - 1}
    chosen = scorer.score(chosen_ids)
    chosen["reward"] = reward({**chosen, **prompt_part}, with_prompt=with_prompt)
    candidates = []
    for seed, gen, ids in samples:
        s = scorer.score(ids)
        cand = {"seed": seed, "text": gen.text, "ids": ids, "stop_reason": gen.stop_reason, **s}
        cand["reward"] = reward({**s, **prompt_part}, with_prompt=with_prompt)
        candidates.append(cand)
    worst = min(range(len(candidates)), key=lambda i: (candidates[i]["reward"], i))  # ties: the first
    return {
        "id": row["id"],
        "index": index,
        "pair": pair_digest(row),
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "max_tokens": max_tokens,
        "prompt": prompt_part,
        "chosen": chosen,
        "candidates": candidates,
        "rejected": worst,
        "rejected_text": candidates[worst]["text"],
        "rejected_ids": candidates[worst]["ids"],
        "reward_kind": "mean over prompt and completion" if with_prompt else "mean over completion",
    }


# -- the stage -------------------------------------------------------------------------------------
class _Progress:
    """Rate and ETA on stderr: one line rewritten in place on a terminal, else a line every ~10 %."""

    def __init__(self, label: str, total: int, done: int):
        self.label, self.total, self.start_done = label, total, done
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)

    def update(self, done: int, note: str = "") -> None:
        if not self.tty and done % self.every and done != self.total:
            return
        run = done - self.start_done
        dt = time.monotonic() - self.t0
        rate = dt / run if run else 0.0
        eta = rate * (self.total - done)
        msg = f"{self.label}: {done}/{self.total} items, {rate:.1f} s/item, ETA {int(eta) // 60}:{int(eta) % 60:02d} {note}"
        print(("\r" + msg + "\x1b[K") if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def _load_partial(partial: Path, fp: str, wanted: dict[str, str]) -> dict[str, dict]:
    """Finished rows of an interrupted run that still match the inputs; a torn last line is dropped."""
    if not partial.exists():
        return {}
    done, dropped = {}, 0
    for line in partial.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("fingerprint") == fp and wanted.get(str(row.get("id"))) == row.get("pair"):
            done[str(row["id"])] = row
        else:
            dropped += 1
    if dropped:  # rewrite without the stale or torn lines before appending to it
        atomic_write_text(partial, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
    return done


def _is_complete(out_path: Path, fp: str, wanted: dict[str, str]) -> bool:
    try:
        rows = read_jsonl(out_path)
    except CopeError:
        return False
    return ([str(r.get("id")) for r in rows] == list(wanted)
            and all(r.get("fingerprint") == fp and r.get("pair") == wanted[str(r.get("id"))] for r in rows))


def run_negatives(pairs_path, base_gguf, user_adapter_gguf, out_path, cfg: TrainConfig, *, tam_gguf=None) -> Path:
    """pairs.jsonl -> negatives.jsonl: K amateur samples per pair, scored; the lowest reward is `rejected_ids`."""
    from cope_local.decode import Decoder
    from cope_local.train.data import turn_end_id

    out_path = Path(out_path)
    rows = read_pairs(pairs_path)
    ids = [str(r["id"]) for r in rows]
    # a pair keeps its index in the whole file (sampling seeds): a capped run's rows equal an uncapped run's
    indexes = preference_indexes(len(rows), cfg)
    wanted = {ids[i]: pair_digest(rows[i]) for i in indexes}  # id -> digest, in the pairs' order
    if cfg.neg_samples < 1:
        raise CopeError(f"neg_samples is {cfg.neg_samples}; it must be at least 1")
    fp = fingerprint(base_gguf, user_adapter_gguf, tam_gguf, cfg)
    if out_path.exists():
        if _is_complete(out_path, fp, wanted):
            return out_path
        print(f"negatives: {out_path.name} is from other inputs or settings; making it again", file=sys.stderr)
    partial = out_path.with_name(out_path.name + ".partial")
    done = _load_partial(partial, fp, wanted)
    progress = _Progress("negatives", len(wanted), len(done))
    if done:
        print(f"negatives: resuming, {len(done)} of {len(wanted)} items already done", file=sys.stderr)
    with Decoder(base_gguf, user_adapter_gguf, tam=tam_gguf) as dec:
        turn_end = turn_end_id(dec.model, dec.chat_template)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                for index in indexes:
                    if ids[index] in done:
                        continue
                    result = {**negatives_for_item(dec, index, rows[index], cfg, turn_end), "fingerprint": fp}
                    f.write(json.dumps(result, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    done[ids[index]] = result
                    best = result["candidates"][result["rejected"]]["reward"]
                    progress.update(len(done), f"(kept reward {best:+.3f}, real text {result['chosen']['reward']:+.3f})")
        finally:
            progress.close()
    with atomic_path(out_path) as tmp:
        tmp.write_text("".join(json.dumps(done[i], ensure_ascii=False) + "\n" for i in wanted), encoding="utf-8")
    partial.unlink(missing_ok=True)
    return out_path
