"""The CoPe token rule, on raw logits (numpy, no model).

CoPe picks, within the head set V_head = {v : p_user(v) >= tau * max p_user},
the token maximising log p_user(v) - alpha * log p_amateur(v).

Both conditions work on raw logits, no softmax needed:
  p_user(v) / max p_user = exp(l_user(v) - max l_user), so the head test is
  l_user(v) >= max l_user + log(tau); and log p = l - logsumexp(l) differs
  from l by a constant over v, so argmax_v [l_user - alpha * l_amateur] is the
  same token as with log-probs (the paper's renormalisation over V_head is a
  constant too). Sampling divides the same scores by a temperature, where
  constants cancel as well.
"""

from __future__ import annotations

import math

import numpy as np


def head_set(user_logits: np.ndarray, tau: float) -> np.ndarray:
    """Token ids of V_head, ascending. user_logits: (V,)."""
    threshold = float(user_logits.max()) + math.log(tau)
    return np.flatnonzero(user_logits >= threshold)


def nucleus_head(user_logits: np.ndarray, head_p: float) -> np.ndarray:
    """An adaptive head set: the fewest top tokens of p_user holding head_p of its mass, ascending ids.

    Unlike the tau rule it is a single token wherever the expert puts more than head_p on its top
    token, however close the runner-up, so the contrast acts only where the expert really hesitates.
    Which of several equally likely tokens at the cut gets in is unspecified. user_logits: (V,).
    """
    return np.sort(_nucleus(_softmax(user_logits), head_p))


def cope_scores(user_logits: np.ndarray, amateur_logits: np.ndarray, head: np.ndarray, alpha: float,
                protected: np.ndarray | None = None) -> np.ndarray:
    """Implicit reward of each head token, up to a constant. -> (len(head),) float64.

    protected: optional bool mask (V,) of tokens the contrast leaves alone (end of turn,
    punctuation...): for them the amateur is taken to agree with the user, log p_amateur :=
    log p_user, so their score is (1 - alpha) log p_user and the contrast can neither push
    them up (stopping early because the amateur would go on) nor down. Needs normalised
    log-probs, so only then are the log-sum-exps computed.
    """
    u = user_logits[head].astype(np.float64)
    a = amateur_logits[head].astype(np.float64)
    if protected is None or not protected[head].any():
        return u - alpha * a
    lu, la = u - _logsumexp(user_logits), a - _logsumexp(amateur_logits)
    la = np.where(protected[head], lu, la)
    return lu - alpha * la


def penalize(logits: np.ndarray, seen, penalty: float) -> np.ndarray:
    """Repetition penalty (the usual form: positive logits divided by `penalty`, negative ones
    multiplied) on the tokens in `seen` (repeats count once); a copy. -> (V,)"""
    if penalty == 1.0 or not seen:
        return logits
    out = logits.copy()
    idx = np.fromiter(seen, dtype=np.int64)
    vals = out[idx]
    out[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def ban_repeats(logits: np.ndarray, generated: list[int], n: int) -> np.ndarray:
    """No repeated n-grams (HF's no_repeat_ngram_size, over the output only): a token that would
    complete an n-gram already in `generated` gets -inf; a copy when any is banned. -> (V,)

    Greedy decoding of a strongly trained adapter loops (one @mention repeated to the token cap,
    README "Results"); a repetition penalty stops that but shortens every output.
    """
    if n <= 0 or len(generated) < n:
        return logits
    prefix = generated[len(generated) - n + 1:]  # the n-1 tokens an n-gram would continue
    banned = {generated[i + n - 1] for i in range(len(generated) - n + 1) if generated[i:i + n - 1] == prefix}
    if not banned:
        return logits
    out = logits.copy()
    out[np.fromiter(banned, dtype=np.int64)] = -np.inf
    return out


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x.astype(np.float64) - m).sum()))


def greedy(head: np.ndarray, scores: np.ndarray) -> int:
    """Highest score; ties go to the lowest token id (np.argmax takes the first)."""
    return int(head[int(np.argmax(scores))])


def sample_top_p(scores: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Index into `scores` drawn from softmax(scores / T) truncated to the top-p nucleus (_nucleus)."""
    if temperature <= 0:
        return int(np.argmax(scores))
    probs = _softmax(scores, temperature)
    nucleus = _nucleus(probs, top_p)
    p = probs[nucleus] / probs[nucleus].sum()
    return int(nucleus[int(rng.choice(len(nucleus), p=p))])


def _softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(scores / T) in float64. -> (V,)"""
    z = scores.astype(np.float64) / temperature
    z -= z.max()
    probs = np.exp(z)
    return probs / probs.sum()


def _nucleus(probs: np.ndarray, mass: float) -> np.ndarray:
    """The fewest most likely ids holding `mass` of `probs`, most likely first (equal ones at the cut: any).

    Exact without sorting the whole vocabulary: try the top 64, then the top 1024 candidates
    (argpartition), and sort everything only when the nucleus is wider than that.
    """
    n = probs.shape[0]
    for k in (64, 1024, n):
        k = min(k, n)
        top = np.argpartition(-probs, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-probs[top], kind="stable")]
        cum = np.cumsum(probs[top])
        if cum[-1] >= mass or k == n:
            cut = int(np.searchsorted(cum, mass)) + 1  # smallest prefix with mass >= `mass`
            return top[: min(cut, k)]
    raise AssertionError("unreachable")
