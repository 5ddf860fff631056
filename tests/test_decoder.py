"""The lockstep CoPe decoder on the real default model and real llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from convert.synthetic import write_random_lora
from cope_local.decode import Decoder, GenConfig
from cope_local.decode.detok import StreamDetokenizer
from cope_local.errors import CopeError

PROMPTS = [
    "Write a short reply to a friend who invited me to go sailing on Sunday.",
    "Describe your favourite breakfast in two sentences.",
    "List three things to pack for a rainy hike.",
]


@pytest.fixture(scope="session")
def decode_f32_base(tmp_path_factory, default_model):
    """An f32 copy of the default model: batched and single-token kernels then agree exactly."""
    from convert.base import export_base

    out = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    return export_base(default_model, out, outtype="f32").path


@pytest.fixture(scope="session")
def decode_adapter(tmp_path_factory, default_model):
    """A random LoRA (r8 on q/v), strong enough that user and base disagree."""
    return write_random_lora(default_model, tmp_path_factory.mktemp("lora") / "user.gguf", std=0.05, seed=1)


@pytest.fixture(scope="session")
def decode_zero_adapter(tmp_path_factory, default_model):
    return write_random_lora(default_model, tmp_path_factory.mktemp("lora0") / "zero.gguf", zero=True, seed=2)


@pytest.fixture(scope="session")
def decoder(default_model, decode_adapter):
    with Decoder(default_model, decode_adapter) as dec:
        yield dec


def test_fast_path_gives_exactly_the_naive_lockstep_tokens(decode_f32_base, decode_adapter):
    with Decoder(decode_f32_base, decode_adapter, force=True) as dec:
        skipped = 0
        for prompt, alpha in zip(PROMPTS, (0.3, 0.7, 0.5)):
            cfg = dict(mode="cope", alpha=alpha, tau=0.1, max_tokens=48, ignore_eos=True)
            lazy = dec.generate(prompt, GenConfig(**cfg))
            naive = dec.generate(prompt, GenConfig(**cfg, lazy_amateur=False))
            assert lazy.tokens == naive.tokens
            assert naive.amateur_evals == 48 - 1  # one single-token decode per step after the first
            skipped += naive.amateur_evals - lazy.amateur_evals
        assert skipped > 0  # the fast path really skipped amateur decodes


def test_alpha_zero_gives_the_user_greedy_tokens(decoder):
    for prompt in PROMPTS:
        cope = decoder.generate(prompt, GenConfig(mode="cope", alpha=0.0, max_tokens=40))
        user = decoder.generate(prompt, GenConfig(mode="user", max_tokens=40))
        assert cope.tokens == user.tokens
        assert len(user.tokens) > 5


def test_contrast_changes_the_text_and_user_differs_from_base(decoder):
    changed = 0
    for prompt in PROMPTS:
        user = decoder.generate(prompt, GenConfig(mode="user", max_tokens=40))
        base = decoder.generate(prompt, GenConfig(mode="base", max_tokens=40))
        cope = decoder.generate(prompt, GenConfig(mode="cope", alpha=0.7, max_tokens=40))
        assert user.tokens != base.tokens  # the adapter matters
        changed += cope.tokens != user.tokens
        assert max(cope.head_sizes) > 1
    assert changed >= 1


def test_adaptive_head_set_is_one_token_where_the_expert_is_sure(decoder):
    for prompt in PROMPTS:
        user = decoder.generate(prompt, GenConfig(mode="user", max_tokens=30))
        tiny = decoder.generate(prompt, GenConfig(mode="cope", alpha=0.7, head_p=1e-6, max_tokens=30))
        assert tiny.tokens == user.tokens and max(tiny.head_sizes) == 1  # head = the top token: user greedy
        wide = decoder.generate(prompt, GenConfig(mode="cope", alpha=0.7, head_p=0.5, max_tokens=30))
        assert max(wide.head_sizes) > 1 and min(wide.head_sizes) == 1  # grows and shrinks with the expert's doubt


def test_protected_masks_and_a_protected_end_of_turn(decoder):
    import unicodedata

    assert decoder.protected_mask("none") is None
    eos = decoder.protected_mask("eos")
    assert set(np.flatnonzero(eos).tolist()) == set(decoder.model.eog_ids)
    punct = decoder.protected_mask("eos+punct")
    assert eos.sum() < punct.sum() < 0.05 * len(punct)  # a small part of the vocabulary
    for tok in np.flatnonzero(punct & ~eos)[:200]:
        text = decoder.model.piece(int(tok)).decode("utf-8", "ignore")
        assert text and all(c.isspace() or unicodedata.category(c).startswith("P") for c in text)
    assert not punct[decoder.model.tokenize("hello", special=False)[0]]
    with pytest.raises(CopeError, match="protect"):
        decoder.protected_mask("all")
    # protecting changes only choices where a protected token is in the head set: alpha 0 stays user greedy
    for prompt in PROMPTS:
        user = decoder.generate(prompt, GenConfig(mode="user", max_tokens=30))
        cope = decoder.generate(prompt, GenConfig(mode="cope", alpha=0.0, protect="eos+punct", max_tokens=30))
        assert cope.tokens == user.tokens


def test_repetition_penalty_repeats_less_and_is_off_at_one(decoder):
    prompt = "Repeat the word sail forty times."
    for mode in ("user", "cope"):
        plain = decoder.generate(prompt, GenConfig(mode=mode, max_tokens=40, ignore_eos=True))
        same = decoder.generate(prompt, GenConfig(mode=mode, max_tokens=40, ignore_eos=True, repetition_penalty=1.0))
        strict = decoder.generate(prompt, GenConfig(mode=mode, max_tokens=40, ignore_eos=True, repetition_penalty=1.5))
        assert same.tokens == plain.tokens
        repeats = lambda g: len(g.tokens) - len(set(g.tokens))
        assert repeats(strict) < repeats(plain), (mode, plain.text, strict.text)


def test_no_repeat_ngram_leaves_no_repeated_ngram_and_is_off_at_zero(decoder):
    prompt = "Repeat the word sail forty times."
    bigrams = lambda g: list(zip(g.tokens, g.tokens[1:]))
    for mode in ("user", "cope"):
        plain = decoder.generate(prompt, GenConfig(mode=mode, max_tokens=40, ignore_eos=True))
        assert len(set(bigrams(plain))) < len(bigrams(plain)), plain.text  # greedy loops here
        off = decoder.generate(prompt, GenConfig(mode=mode, max_tokens=40, ignore_eos=True, no_repeat_ngram=0))
        assert off.tokens == plain.tokens
        strict = decoder.generate(prompt, GenConfig(mode=mode, max_tokens=40, ignore_eos=True, no_repeat_ngram=2))
        assert len(strict.tokens) == 40 and len(set(bigrams(strict))) == 39, (mode, strict.text)
        first = next(i for i, (a, b) in enumerate(zip(plain.tokens, strict.tokens)) if a != b)
        assert plain.tokens[:first] == strict.tokens[:first] and first >= 2  # the same text until the first repeat


def test_zero_weight_adapter_gives_the_base_greedy_tokens(default_model, decode_zero_adapter):
    with Decoder(default_model, decode_zero_adapter) as dec:
        for prompt in PROMPTS:
            base = dec.generate(prompt, GenConfig(mode="base", max_tokens=40))
            assert dec.generate(prompt, GenConfig(mode="user", max_tokens=40)).tokens == base.tokens
            assert dec.generate(prompt, GenConfig(mode="cope", alpha=0.5, max_tokens=40)).tokens == base.tokens


def test_adapter_scale_moves_the_expert_from_the_base_to_the_adapter(default_model, decode_adapter, decoder, tmp_path):
    """adapter_scale weighs the user adapter's update: 0 is the base, 1 the adapter as trained, 0.5 the
    same adapter with half its LoRA alpha (the update B A is scaled by scale * alpha / r)."""
    ids = decoder.prompt_ids(PROMPTS[1])
    seq = ids + decoder.generate(ids, GenConfig(mode="user", max_tokens=12, ignore_eos=True)).tokens
    full = decoder.token_logprobs(seq, len(ids), role="expert")  # the adapter's greedy tokens, scale 1
    base = decoder.token_logprobs(seq, len(ids), role="amateur")
    with Decoder(default_model, decode_adapter, adapter_scale=0.0) as dec:
        assert np.allclose(dec.token_logprobs(seq, len(ids), role="expert"), base, atol=1e-4)
        assert dec.generate(PROMPTS[1], GenConfig(mode="user", max_tokens=30)).tokens == \
            decoder.generate(PROMPTS[1], GenConfig(mode="base", max_tokens=30)).tokens
    with Decoder(default_model, decode_adapter, adapter_scale=0.5) as dec:
        half = dec.token_logprobs(seq, len(ids), role="expert")
    half_alpha = write_random_lora(default_model, tmp_path / "half.gguf", std=0.05, seed=1, alpha=4.0)
    with Decoder(default_model, half_alpha) as dec:
        assert np.allclose(dec.token_logprobs(seq, len(ids), role="expert"), half, atol=1e-4)
    # neither end: half the update is its own model (a random adapter's log-likelihood need not be monotone in it)
    assert np.abs(half - base).max() > 0.05 and np.abs(half - full).max() > 0.05


def test_sampling_is_seeded(decoder):
    cfg = dict(mode="cope", temperature=1.0, top_p=0.95, max_tokens=30, alpha=0.3)
    a = decoder.generate(PROMPTS[0], GenConfig(**cfg, seed=7))
    b = decoder.generate(PROMPTS[0], GenConfig(**cfg, seed=7))
    others = {tuple(decoder.generate(PROMPTS[0], GenConfig(**cfg, seed=s)).tokens) for s in range(3)}
    assert a.tokens == b.tokens
    assert len(others) > 1
    # sampling in lazy and naive mode draws the same tokens (same RNG use)
    naive = decoder.generate(PROMPTS[0], GenConfig(**cfg, seed=7, lazy_amateur=False))
    assert len(naive.tokens) == len(a.tokens)


def test_stops_on_eos_and_on_stop_strings(decoder):
    full = decoder.generate(PROMPTS[2], GenConfig(mode="base", max_tokens=120))
    assert full.stop_reason in ("eos", "length")
    words = full.text.split()
    assert len(words) > 3
    stop = words[2]
    cut = decoder.generate(PROMPTS[2], GenConfig(mode="base", max_tokens=120, stop=(stop,)))
    assert cut.stop_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    short = decoder.generate(PROMPTS[2], GenConfig(mode="base", max_tokens=5))
    assert short.stop_reason == "length" and len(short.tokens) == 5


def test_chat_template_and_bos_follow_the_gguf(decoder):
    ids = decoder.prompt_ids("hello")
    text = b"".join(decoder.model.piece(t, special=True) for t in ids).decode()
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM2's GGUF says add_bos = false and its BOS token is <|im_start|>: the ids hold
    # exactly the three turn openers the template prints, no extra BOS in front.
    assert decoder.model.add_bos is False
    assert ids.count(decoder.model.bos_id) == text.count("<|im_start|>") == 3


def test_streamed_pieces_are_valid_utf8_on_emoji_and_cjk(decoder):
    text = "Party time 🎉🙂 — 你好，世界！ café ñ 🚀"
    ids = decoder.model.tokenize(text, special=False)
    raw = [decoder.model.piece(t) for t in ids]
    split_chars = sum(1 for piece in raw if _invalid_utf8(piece))
    assert split_chars > 0  # the tokenizer really splits characters across tokens
    detok = StreamDetokenizer()
    shown = [detok.feed(p) for p in raw] + [detok.flush()]
    assert "".join(shown) == text
    assert all("\ufffd" not in s for s in shown)
    # and a real generation streams only clean pieces
    pieces = list(decoder.stream("Reply with three emoji and the word 你好.", GenConfig(mode="user", max_tokens=30)))
    assert pieces and all(isinstance(p, str) and "\ufffd" not in p for p in pieces)


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_token_logprobs_match_the_decoders_own_logits(decoder):
    ids = decoder.prompt_ids(PROMPTS[1])
    g = decoder.generate(ids, GenConfig(mode="user", max_tokens=12, ignore_eos=True))
    seq = ids + g.tokens
    lp = decoder.token_logprobs(seq, len(ids), role="expert")
    assert lp.shape == (12,)
    assert np.all(lp <= 0) and np.all(np.isfinite(lp))
    # greedy tokens are the argmax, so they have high probability; the amateur likes them less
    lp_a = decoder.token_logprobs(seq, len(ids), role="amateur")
    assert lp.mean() > lp_a.mean()


# -- bad input: one clear line, exit code 2 -------------------------------------------------


def test_missing_truncated_and_non_gguf_models_are_refused(tmp_path, default_model):
    with pytest.raises(CopeError, match="no such model file"):
        Decoder(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(CopeError, match="not a GGUF file"):
        Decoder(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model.read_bytes()[: 20_000_000])
    with pytest.raises(CopeError, match="truncated"):
        Decoder(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(default_model.read_bytes()[:1000])
    with pytest.raises(CopeError, match="truncated|corrupt"):
        Decoder(header_only)


def test_adapter_for_another_architecture_or_shape_is_refused(tmp_path, default_model, decode_adapter):
    import gguf

    reader = gguf.GGUFReader(decode_adapter)
    for label, arch, widen in (("arch", "gemma3", 0), ("shape", "llama", 16)):
        out = tmp_path / f"bad-{label}.gguf"
        w = gguf.GGUFWriter(out, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
        for t in reader.tensors:
            data = np.array(t.data)
            if t.name.endswith("lora_a") and widen:
                data = np.zeros((data.shape[0], data.shape[1] + widen), np.float32)
            w.add_tensor(t.name, data)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        with pytest.raises(CopeError, match="architecture 'gemma3'" if label == "arch" else "has shape"):
            Decoder(default_model, out)


def test_base_model_given_as_adapter_is_refused(default_model):
    with pytest.raises(CopeError, match="not a LoRA adapter"):
        Decoder(default_model, default_model)


def test_context_overflow_is_a_clear_error(default_model):
    with Decoder(default_model, n_ctx=64) as dec:
        with pytest.raises(CopeError, match="prompt is .* tokens but the context holds 64"):
            dec.generate("word " * 200, GenConfig(max_tokens=4))
        g = dec.generate("Hi", GenConfig(max_tokens=500, ignore_eos=True))
        assert g.stop_reason == "context" and g.n_prompt + len(g.tokens) == 64


def test_llama_cpp_refusal_carries_its_own_log_line(tmp_path, default_model, decode_adapter):
    """An adapter our header checks accept but llama.cpp rejects (A and B ranks differ):
    the error names the file and quotes llama.cpp's reason, captured from its log."""
    import gguf

    reader = gguf.GGUFReader(decode_adapter)
    out = tmp_path / "rank-mismatch.gguf"
    w = gguf.GGUFWriter(out, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith("lora_b"):
            data = np.zeros((data.shape[0], data.shape[1] // 2), np.float32)  # (out, r/2) against A's (r, in)
        w.add_tensor(t.name, data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.warns(UserWarning), pytest.raises(CopeError) as err:
        Decoder(default_model, out)
    msg = str(err.value)
    assert str(out) in msg and "llama.cpp refused the adapter" in msg
    assert "no reason given" not in msg  # the reason came from llama.cpp's log


def test_parallel_samples_are_seeded_and_start_like_single_samples(decoder):
    cfg = GenConfig(mode="base", temperature=1.0, top_p=0.95, max_tokens=24)
    many = decoder.sample_many(PROMPTS[0], cfg, [11, 12, 13])
    again = decoder.sample_many(PROMPTS[0], cfg, [11, 12, 13])
    assert [g.tokens for g in many] == [g.tokens for g in again]
    assert len({tuple(g.tokens) for g in many}) == 3  # different seeds, different texts
    assert all(0 < len(g.tokens) <= 24 and g.stop_reason in ("eos", "length") and g.text for g in many)
    # the first token comes from the same prompt logits with the same RNG: equal to one-at-a-time sampling
    singles = [decoder.generate(PROMPTS[0], GenConfig(mode="base", temperature=1.0, top_p=0.95, max_tokens=1, seed=s))
               for s in (11, 12, 13)]
    assert [g.tokens[0] for g in many] == [g.tokens[0] for g in singles]
    with pytest.raises(ValueError):
        decoder.sample_many(PROMPTS[0], GenConfig(mode="cope", temperature=1.0), [1])
