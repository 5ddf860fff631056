"""The CoPe token rule on random logits (no model)."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cope_local.decode import rule

logits_1d = arrays(np.float32, st.integers(2, 300), elements=st.floats(-30, 30, width=32))


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x)


def _random_pair(seed: int, vocab: int):
    """(rng, user logits, amateur logits, the user's tau-0.1 head set) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    user = rng.normal(0, 3, vocab).astype(np.float32)
    amateur = rng.normal(0, 3, vocab).astype(np.float32)
    return rng, user, amateur, rule.head_set(user, 0.1)


@settings(max_examples=200, deadline=None)
@given(logits_1d, st.floats(1e-4, 1.0))
def test_head_set_is_exactly_the_tau_ratio_set(logits, tau):
    head = rule.head_set(logits, tau)
    p = np.exp(_log_softmax(logits))
    ratio = p / p.max()
    assert int(np.argmax(logits)) in head  # never empty: the top token is always in
    inside = np.zeros(len(logits), bool)
    inside[head] = True
    # agrees with the probability definition except within float rounding of the threshold
    margin = np.abs(np.log(np.maximum(ratio, 1e-300)) - math.log(tau)) > 1e-4
    assert np.array_equal(inside[margin], (ratio >= tau)[margin])


@settings(max_examples=200, deadline=None)
@given(logits_1d, st.floats(0.01, 1.0))
def test_nucleus_head_is_the_fewest_top_tokens_holding_head_p(logits, head_p):
    head = rule.nucleus_head(logits, head_p)
    p = np.exp(_log_softmax(logits))
    assert np.all(np.diff(head) > 0) and p[head].max() == p.max()  # ascending ids; the top token (or a tie) in
    outside = np.setdiff1d(np.arange(len(logits)), head)
    if outside.size:  # every token in it is at least as likely as every token left out
        assert p[head].min() >= p[outside].max() - 1e-12
    mass = p[np.sort(p)[::-1] >= p[head].min()].sum()
    assert p[head].sum() >= head_p - 1e-9 or mass >= 1 - 1e-9  # holds head_p (or everything)
    assert p[head].sum() - p[head].min() < head_p + 1e-9  # one token fewer would not


def test_nucleus_head_is_one_token_where_the_expert_is_sure_and_wide_where_it_hesitates():
    sure = np.log(np.array([0.55, 0.40, 0.05]))  # the tau rule (0.3) keeps the runner-up, the nucleus does not
    assert rule.nucleus_head(sure, 0.5).tolist() == [0] and rule.head_set(sure, 0.3).tolist() == [0, 1]
    torn = np.log(np.array([0.05, 0.30, 0.30, 0.30, 0.05]))
    assert rule.nucleus_head(torn, 0.5).tolist() == [1, 2] and rule.nucleus_head(torn, 0.85).tolist() == [1, 2, 3]
    wide = np.random.default_rng(0).normal(0, 0.01, 5000)  # nearly flat: wider than the first 1024 candidates
    assert 1024 < len(rule.nucleus_head(wide, 0.5)) < 5000


@settings(max_examples=100, deadline=None)
@given(logits_1d)
def test_tau_one_keeps_only_the_maxima(logits):
    head = rule.head_set(logits, 1.0)
    assert set(head.tolist()) == set(np.flatnonzero(logits == logits.max()).tolist())


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(5, 400), st.floats(0.0, 1.0))
def test_raw_logit_scores_pick_the_same_token_as_logprob_scores(seed, vocab, alpha):
    _rng, user, amateur, head = _random_pair(seed, vocab)
    tok = rule.greedy(head, rule.cope_scores(user, amateur, head, alpha))
    by_logprob = head[np.argmax(_log_softmax(user)[head] - alpha * _log_softmax(amateur)[head])]
    assert tok == by_logprob


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(5, 400), st.floats(0.0, 1.0))
def test_protected_tokens_score_as_if_the_amateur_agreed(seed, vocab, alpha):
    rng, user, amateur, head = _random_pair(seed, vocab)
    protected = rng.random(vocab) < 0.3
    scores = rule.cope_scores(user, amateur, head, alpha, protected)
    lu, la = _log_softmax(user)[head], _log_softmax(amateur)[head]
    expected = np.where(protected[head], (1 - alpha) * lu, lu - alpha * la)
    if protected[head].any():
        assert np.allclose(scores, expected, atol=1e-6)
    else:  # nothing protected in the head: the plain rule (up to its constant)
        assert rule.greedy(head, scores) == head[np.argmax(expected)]
    assert rule.greedy(head, rule.cope_scores(user, amateur, head, alpha, np.zeros(vocab, bool))) == \
        rule.greedy(head, rule.cope_scores(user, amateur, head, alpha))


def test_alpha_zero_is_user_greedy_and_contrast_prefers_what_the_amateur_dislikes():
    user = np.array([2.0, 1.9, -5.0, 1.5], np.float32)
    amateur = np.array([3.0, -1.0, 0.0, 0.0], np.float32)
    head = rule.head_set(user, 0.1)
    assert head.tolist() == [0, 1, 3]
    assert rule.greedy(head, rule.cope_scores(user, amateur, head, 0.0)) == 0
    assert rule.greedy(head, rule.cope_scores(user, amateur, head, 0.5)) == 1  # 1.9+0.5 > 2.0-1.5
    assert 2 not in head  # far below tau: never chosen, however much the amateur dislikes it


def test_sampling_is_seeded_and_stays_in_the_nucleus():
    scores = np.array([5.0, 4.0, 0.0, -3.0, -10.0])
    draws = [rule.sample_top_p(scores, 1.0, 0.9, np.random.default_rng(s)) for s in range(300)]
    again = [rule.sample_top_p(scores, 1.0, 0.9, np.random.default_rng(s)) for s in range(300)]
    assert draws == again
    p = np.exp(scores - scores.max()); p /= p.sum()
    assert p[0] < 0.9 <= p[0] + p[1]  # the nucleus is exactly tokens {0, 1}
    assert set(draws) == {0, 1}
    share0 = draws.count(0) / len(draws)
    assert abs(share0 - p[0] / (p[0] + p[1])) < 0.07


def test_nucleus_is_exact_for_wide_distributions():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 0.01, 5000)  # nearly flat: nucleus wider than 1024
    p = np.exp(scores - scores.max()); p /= p.sum()
    order = np.argsort(-p, kind="stable")
    need = int(np.searchsorted(np.cumsum(p[order]), 0.95)) + 1
    allowed = set(order[:need].tolist())
    draws = {rule.sample_top_p(scores, 1.0, 0.95, np.random.default_rng(s)) for s in range(200)}
    assert draws <= allowed
    assert need > 1024


def test_repetition_penalty_lowers_only_the_seen_tokens():
    logits = np.array([2.0, -1.0, 3.0, 0.5], np.float32)
    out = rule.penalize(logits, {0, 1}, 2.0)
    assert out.tolist() == [1.0, -2.0, 3.0, 0.5] and logits.tolist() == [2.0, -1.0, 3.0, 0.5]
    assert rule.penalize(logits, {0, 1}, 1.0) is logits and rule.penalize(logits, set(), 2.0) is logits


def test_ban_repeats_bans_exactly_the_tokens_that_would_repeat_an_ngram():
    logits = np.zeros(10, dtype=np.float32)
    out = [1, 2, 3, 5, 2, 4, 1, 2]  # "1 2" was followed by 3; "2" by 3 and by 4
    def banned(n):
        return np.flatnonzero(np.isneginf(rule.ban_repeats(logits, out, n))).tolist()

    assert banned(3) == [3] and banned(2) == [3, 4] and banned(1) == [1, 2, 3, 4, 5] and banned(4) == []
    assert rule.ban_repeats(logits, out, 0) is logits and rule.ban_repeats(logits, [1, 2], 3) is logits
    assert not np.isneginf(logits).any()  # a copy, never in place
