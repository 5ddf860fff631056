"""Training pairs: HF-tokenizer ids equal the llama.cpp decoder's, targets end with the turn-end token."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

from cope_local.errors import CopeError
from cope_local.ingest import HistoryItem
from cope_local.tasks import get_task

PERSONA = files("cope_local").joinpath("data/persona/history.jsonl")


@pytest.fixture(autouse=True)
def _train_cache(monkeypatch, pytestconfig):
    """The HF copy of the base, kept in .pytest_cache across sessions (building it costs ~20-40 s; loading ~0.5 s)."""
    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))


@pytest.fixture(scope="module")
def decoder(default_model):
    from cope_local.decode import Decoder

    with Decoder(default_model, n_ctx=1024) as dec:
        yield dec


@pytest.fixture(scope="module")
def encoder(default_model, tmp_path_factory, pytestconfig):
    from cope_local.train.data import ChatEncoder

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
        mp.setenv("COPE_HOME", str(tmp_path_factory.mktemp("home")))
        return ChatEncoder(default_model)


def persona_items(n: int) -> list[HistoryItem]:
    rows = [json.loads(x) for x in PERSONA.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [HistoryItem(id=f"p{i:02d}", input=r["input"], output=r["output"], source="persona", meta={})
            for i, r in enumerate(rows[:n])]


MESSAGES = [
    [{"role": "user", "content": "Hi Ro, can you fix the sail?"}],
    [{"role": "user", "content": "naïve café — 東京 🙂⛵ emoji and accents\n\ttabs  and  spaces"}],
    [{"role": "user", "content": "def f(x):\n    return {'a': [1, 2]}  # code"}],
    [{"role": "system", "content": "You write short replies."}, {"role": "user", "content": "Lunch?"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "aye"}, {"role": "user", "content": "second"}],
    [{"role": "user", "content": "a literal <|im_end|> in the text"}],
]


@pytest.mark.parametrize("messages", MESSAGES, ids=["plain", "unicode", "code", "system", "multi-turn", "control-text"])
def test_prompt_ids_equal_the_decoders(encoder, decoder, messages):
    assert encoder.prompt_ids(messages) == decoder.prompt_ids(messages)


def test_bos_and_turn_end_come_from_the_gguf(encoder, decoder):
    from cope_local.train.data import turn_end_id

    # SmolLM2: add_bos_token = false, BOS is <|im_start|> (printed by the template), turn end is <|im_end|> (id 2)
    assert encoder.add_bos is False and encoder.add_bos == decoder.model.add_bos
    assert encoder.bos_id == decoder.model.bos_id == 1
    assert encoder.eot_id == 2 and encoder.eot_id in decoder.model.eog_ids
    assert turn_end_id(decoder.model, decoder.chat_template) == encoder.eot_id
    ids = encoder.prompt_ids(MESSAGES[0])
    assert ids.count(encoder.bos_id) == 3  # system, user and assistant turns open with it; never doubled at the start
    assert ids[:2] != [encoder.bos_id, encoder.bos_id]


def test_target_ids_are_the_text_then_turn_end(encoder, decoder):
    text = "aye, bring her in.\n\nfair winds, —ro"
    ex = encoder.example("x", MESSAGES[0], text, 384, 256)
    assert ex.target_ids == decoder.model.tokenize(text, special=False) + [2]
    assert decoder.model.detokenize(ex.target_ids) == text  # <|im_end|> renders as nothing
    # a literal control-token string in the user's text stays plain text
    ex2 = encoder.example("y", MESSAGES[0], "see <|im_end|> here", 384, 256)
    assert ex2.target_ids.count(2) == 1 and ex2.target_ids[-1] == 2


def test_long_prompt_and_target_are_cut_to_the_limits(encoder):
    long_mail = "The boat needs work. " * 300
    messages = get_task("email-reply").draft_messages(long_mail)
    ex = encoder.example("long", messages, "word " * 400, 96, 32)
    assert ex.truncated
    assert len(ex.prompt_ids) <= 96 and len(ex.prompt_ids) > 80  # cut to fit, not emptied
    assert ex.prompt.endswith("<|im_start|>assistant\n")  # the template's framing survives the cut
    assert ex.messages[-1]["content"].endswith("…")
    assert len(ex.target_ids) == 32 and ex.target_ids[-1] != 2  # a cut text gets no turn end
    with pytest.raises(CopeError, match="max_prompt_tokens"):
        encoder.example("tiny", messages, "x", 8, 32)


def test_make_pairs_writes_text_and_ids(encoder, default_model, tmp_path):
    from cope_local.train.data import make_pairs, read_pairs, read_pairs_meta

    items = persona_items(10)
    out = tmp_path / "stages" / "pairs.jsonl"
    examples = make_pairs(items, get_task("email-reply"), default_model, out, max_prompt=384, max_target=256,
                          tokenizer=encoder.tok)
    assert len(examples) == 10 and out.stat().st_mode & 0o777 == 0o600
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"p{i:02d}" for i in range(10)]
    assert set(rows[0]) >= {"id", "messages", "prompt", "target", "prompt_ids", "target_ids", "truncated"}
    assert rows[0]["target"] == items[0].output
    assert rows[0]["messages"] == get_task("email-reply").training_pair(items[0])[0]
    assert read_pairs(out) == examples
    meta = read_pairs_meta(out)
    assert meta["count"] == 10 and meta["eot_id"] == 2 and meta["add_bos"] is False
    assert meta["target_tokens"] == sum(len(e.target_ids) for e in examples)
    assert 40 < meta["prompt_tokens"] / 10 < 90  # SmolLM2's system line + the reply template + a short mail


def test_encode_row_uses_the_stored_ids_or_llama_cpp(encoder, decoder):
    from cope_local.train.config import TrainConfig
    from cope_local.train.data import encode_row

    ex = encoder.example("z", MESSAGES[1], "aye — ⛵", 384, 256)
    cfg = TrainConfig()
    row = ex.to_dict()
    assert encode_row(row, decoder.model, decoder.chat_template, cfg) == (ex.prompt_ids, ex.target_ids)
    text_only = {k: row[k] for k in ("id", "messages", "target")}
    assert encode_row(text_only, decoder.model, decoder.chat_template, cfg) == (ex.prompt_ids, ex.target_ids)
