"""Prompt rendering equals transformers' chat templating; BOS is added exactly once."""

from __future__ import annotations

import pytest

from cope_local.decode.prompt import render_chat, with_bos
from cope_local.gguf_file import read_info

MESSAGES = [
    [{"role": "user", "content": "Reply to Ann: can we move the call? 🙂"}],
    [{"role": "system", "content": "You write short emails."}, {"role": "user", "content": "Thank Bo for the 漢字 book."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "again"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(default_model):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model.parent), gguf_file=default_model.name)


@pytest.mark.parametrize("messages", MESSAGES)
def test_render_matches_transformers_apply_chat_template(hf_tokenizer, default_model, messages):
    meta = read_info(default_model).metadata
    ours = render_chat(messages, meta["tokenizer.chat_template"], bos_token=hf_tokenizer.bos_token or "",
                       eos_token=hf_tokenizer.eos_token or "", add_bos=bool(meta.get("tokenizer.ggml.add_bos_token")))
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


def test_bos_is_added_once_and_only_when_asked():
    assert with_bos([5, 6], 1, True) == [1, 5, 6]
    assert with_bos([1, 5, 6], 1, True) == [1, 5, 6]  # a template that printed BOS: not doubled
    assert with_bos([5, 6], 1, False) == [5, 6]
    assert with_bos([], 1, True) == [1]


def test_template_that_prints_bos_is_not_doubled():
    template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "x"}]
    assert render_chat(msgs, template, bos_token="<s>", add_bos=True) == "<user>x"  # with_bos adds it back once
    assert render_chat(msgs, template, bos_token="<s>", add_bos=False) == "<s><user>x"


def test_no_template_gives_plain_text():
    assert render_chat([{"role": "user", "content": " Hello "}], None) == "Hello\n\n"
