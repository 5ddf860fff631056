"""Synthetic negatives on the real default model: K amateur samples, scored, the lowest reward kept."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from conftest import TRAIN_TINY_HISTORY, train_tiny_cfg

from cope_local.decode import Decoder
from cope_local.train import negatives as neg_mod
from cope_local.train.data import turn_end_id
from cope_local.train.negatives import candidate_length, run_negatives


def _rows(path):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


def test_kept_negative_is_the_lowest_reward_candidate(default_model, train_tiny_pairs, train_random_user,
                                                      train_tiny_negatives):
    rows = _rows(train_tiny_negatives)
    pairs = _rows(train_tiny_pairs)
    cfg = train_tiny_cfg()
    assert [r["id"] for r in rows] == [p["id"] for p in pairs]
    assert stat.S_IMODE(os.stat(train_tiny_negatives).st_mode) == 0o600
    assert not train_tiny_negatives.with_name(train_tiny_negatives.name + ".partial").exists()
    # recompute every score independently: a fresh decoder, per-token log-probs, our own means
    with Decoder(default_model, train_random_user.gguf) as dec:
        eot = turn_end_id(dec.model, dec.chat_template)
        for row, pair in zip(rows, pairs):
            # prompt ids as drafting builds them, chosen = the user's text + end of turn
            assert row["prompt_ids"] == dec.prompt_ids(pair["messages"])
            assert row["chosen_ids"] == dec.model.tokenize(pair["target"], special=False) + [eot]
            cands = row["candidates"]
            assert len(cands) == cfg.neg_samples == 3
            assert len({c["seed"] for c in cands}) == 3
            n_p = len(row["prompt_ids"])
            rewards = []
            for c in cands:
                ids = row["prompt_ids"] + c["ids"]
                # the decoder's own scoring, from a cleared cache (the stage reuses the prompt's cache;
                # the batches are the same, so the numbers must be too)
                expert = dec.token_logprobs(ids, n_p, role="expert")
                amateur = dec.token_logprobs(ids, n_p, role="amateur")
                r = float(np.mean(expert) - np.mean(amateur))
                assert c["reward"] == pytest.approx(r, abs=1e-4)
                assert c["expert_sum"] == pytest.approx(float(expert.sum()), abs=1e-3)
                assert c["amateur_sum"] == pytest.approx(float(amateur.sum()), abs=1e-3)
                assert c["n"] == len(c["ids"])
                # the text is what was sampled; the end of turn only where the amateur ended it
                ended = c["stop_reason"] == "eos"
                assert (c["ids"][-1] == eot) == ended
                assert dec.model.detokenize(c["ids"][:-1] if ended else c["ids"]) == c["text"]
                if not ended:
                    assert len(c["ids"]) == row["max_tokens"] == candidate_length(cfg, len(row["chosen_ids"]))
                rewards.append(r)
            assert row["rejected"] == int(np.argmin(rewards))
            assert row["rejected_ids"] == cands[row["rejected"]]["ids"]
            assert row["rejected_text"] == cands[row["rejected"]]["text"]
            # the real text's reward is saved too (a diagnostic)
            ids = row["prompt_ids"] + row["chosen_ids"]
            r_chosen = np.mean(dec.token_logprobs(ids, n_p, "expert")) - np.mean(dec.token_logprobs(ids, n_p, "amateur"))
            assert row["chosen"]["reward"] == pytest.approx(float(r_chosen), abs=1e-4)
            for role in ("expert", "amateur"):
                prompt_sum = dec.token_logprobs(row["prompt_ids"], 1, role).sum()
                assert row["prompt"][f"{role}_prompt_sum"] == pytest.approx(float(prompt_sum), abs=1e-3)
    # the user adapter matters: the candidates' rewards are not all equal
    spread = [max(c["reward"] for c in r["candidates"]) - min(c["reward"] for c in r["candidates"]) for r in rows]
    assert min(spread) > 1e-3


def test_the_papers_score_ranks_by_the_mean_over_prompt_and_completion(train_tiny_negatives):
    """The saved prompt sums give the paper's score back (cfg.neg_reward_prompt=True ranks by it)."""
    for row in _rows(train_tiny_negatives):
        p = row["prompt"]
        for c in row["candidates"]:
            paper = neg_mod.reward({**c, **p}, with_prompt=True)
            n = c["n"] + p["n_prompt_scored"]
            assert paper == pytest.approx((c["expert_sum"] + p["expert_prompt_sum"] - c["amateur_sum"]
                                           - p["amateur_prompt_sum"]) / n)
        assert p["n_prompt_scored"] == len(row["prompt_ids"]) - 1


def test_resume_skips_done_rows_and_ends_as_an_uninterrupted_run(default_model, train_tiny_pairs, train_random_user,
                                                                   train_tiny_negatives, tmp_path, monkeypatch):
    out = tmp_path / "negatives.jsonl"
    cfg = train_tiny_cfg()
    calls = []
    real = neg_mod.negatives_for_item

    def interrupted_after_three(dec, index, row, cfg, turn_end):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(index)
        return real(dec, index, row, cfg, turn_end)

    monkeypatch.setattr(neg_mod, "negatives_for_item", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_negatives(train_tiny_pairs, default_model, train_random_user.gguf, out, cfg)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(_rows(partial)) == 3
    assert stat.S_IMODE(os.stat(partial).st_mode) == 0o600
    with open(partial, "a") as f:  # a kill in the middle of writing a row leaves a torn line
        f.write('{"id": "t3", "cand')

    calls.clear()
    monkeypatch.setattr(neg_mod, "negatives_for_item", lambda *a: (calls.append(a[1]), real(*a))[1])
    run_negatives(train_tiny_pairs, default_model, train_random_user.gguf, out, cfg)
    assert calls == list(range(3, len(TRAIN_TINY_HISTORY)))  # only the items not done before
    assert _rows(out) == _rows(train_tiny_negatives)  # same seeds per item: the same file as one uninterrupted run
    assert not partial.exists()

    # done: a rerun builds no decoder and returns the file as it is
    monkeypatch.setattr("cope_local.decode.Decoder", lambda *a, **k: pytest.fail("a finished stage ran again"))
    before = out.read_bytes()
    assert run_negatives(train_tiny_pairs, default_model, train_random_user.gguf, out, cfg) == out
    assert out.read_bytes() == before


def test_a_changed_pair_or_setting_is_redone(default_model, train_tiny_pairs, train_random_user, train_tiny_negatives,
                                             tmp_path, monkeypatch):
    """Rows are only reused for the same text and the same settings, never mixed with stale ones."""
    pairs = _rows(train_tiny_pairs)
    pairs[1] = {"id": pairs[1]["id"], "messages": pairs[1]["messages"], "target": "new cafe. closed. #sad"}
    changed = tmp_path / "pairs.jsonl"
    changed.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "negatives.jsonl"
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(train_tiny_negatives.read_bytes())  # as if an earlier run had done them all
    calls = []
    real = neg_mod.negatives_for_item
    monkeypatch.setattr(neg_mod, "negatives_for_item", lambda *a: (calls.append(a[1]), real(*a))[1])
    run_negatives(changed, default_model, train_random_user.gguf, out, train_tiny_cfg())
    assert calls == [1]
    rows = _rows(out)
    assert rows[1]["chosen_ids"][:-1] != _rows(train_tiny_negatives)[1]["chosen_ids"][:-1]
    assert [r for i, r in enumerate(rows) if i != 1] == [r for i, r in enumerate(_rows(train_tiny_negatives)) if i != 1]

    calls.clear()  # another K: the rows of the earlier run are not reused
    out.unlink()
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps(p) + "\n" for p in pairs[:2]))
    partial.write_bytes(train_tiny_negatives.read_bytes())
    run_negatives(two, default_model, train_random_user.gguf, out, train_tiny_cfg(neg_samples=1))
    assert calls == [0, 1]
    assert all(len(r["candidates"]) == 1 and r["rejected"] == 0 for r in _rows(out))


def test_a_pair_cap_mines_the_newest_pairs_as_an_uncapped_run_does(default_model, train_tiny_pairs, train_random_user,
                                                                   train_tiny_negatives, tmp_path, monkeypatch):
    """dpo_max_pairs = 2: only the last 2 pairs get negatives (same seeds: the uncapped run's rows), and DPO uses them."""
    from cope_local.train.dpo import build_rows

    out = tmp_path / "negatives.jsonl"
    cfg = train_tiny_cfg(dpo_max_pairs=2)
    calls = []
    real = neg_mod.negatives_for_item
    monkeypatch.setattr(neg_mod, "negatives_for_item", lambda *a: (calls.append(a[1]), real(*a))[1])
    run_negatives(train_tiny_pairs, default_model, train_random_user.gguf, out, cfg)
    n = len(TRAIN_TINY_HISTORY)
    assert calls == [n - 2, n - 1]
    assert _rows(out) == _rows(train_tiny_negatives)[-2:]
    assert [r["id"] for r in build_rows(train_tiny_pairs, out, cfg)] == [p["id"] for p in _rows(train_tiny_pairs)[-2:]]
    with pytest.raises(Exception, match="no negative for pair"):  # uncapped DPO on capped negatives: stale, an error
        build_rows(train_tiny_pairs, out, train_tiny_cfg())
    with pytest.raises(Exception, match="dpo_max_pairs is -1"):
        run_negatives(train_tiny_pairs, default_model, train_random_user.gguf, out, train_tiny_cfg(dpo_max_pairs=-1))
