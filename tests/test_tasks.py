"""Task templates: (prompt, target) pairs, draft prompts, and inputs made for items without one."""

from __future__ import annotations

import pytest

from cope_local.errors import CopeError
from cope_local.ingest import HistoryItem
from cope_local.tasks import (PARAPHRASE_EXAMPLES, TASKS, clean_generated, echoes_example, get_task, list_tasks,
                              paraphrase_messages, topic_of)
from cope_local.tasks import registry
from cope_local.tasks.registry import loops, until_repeat


def item(output, input=None, **meta):
    return HistoryItem(id="x", input=input, output=output, source="t", meta=meta)


def user(text):
    return [{"role": "user", "content": text}]


def test_registry():
    assert set(TASKS) == {"email-reply", "email", "review", "post", "rewrite", "headline", "title", "free", "lamp7"}
    for t in list_tasks():
        assert t.description and t.max_new_tokens > 0 and 0 < t.default_alpha < 1 and "{input}" in t.template
    assert {t.name for t in list_tasks() if t.default_alpha != 0.3} == {"rewrite", "lamp7"}
    # the paper's tau and OPPU drafting alone, except where measured otherwise (LaMP-7, README "Results")
    assert {t.name for t in list_tasks() if t.default_tau != 0.1 or t.sft_mode != "user"} == {"lamp7"}
    assert get_task("LaMP-7") is TASKS["lamp7"] and get_task(" Email-Reply ") is TASKS["email-reply"]
    with pytest.raises(CopeError, match="unknown task"):
        get_task("poem")


def test_lamp7_prompt_is_the_benchmark_one():
    t = get_task("lamp7")
    assert t.draft_messages("i love rain") == user(
        "Paraphrase the following tweet without any explanation before or after it: i love rain")


def test_training_and_drafting_share_the_template():
    t = get_task("email-reply")
    msgs, target = t.training_pair(item("aye, friday.", "Can you fix it by Friday?", input_from="quoted", subject="RE: sail"))
    assert msgs == t.draft_messages("Can you fix it by Friday?") == user("Write a reply to this email:\n\nCan you fix it by Friday?")
    assert target == "aye, friday."


def test_email_reply_without_input_falls_back_to_a_new_email_on_the_subject():
    msgs, _ = get_task("email-reply").training_pair(item("the loft opens at nine.", subject="Fw: RE: Opening hours"))
    assert msgs == user("Write an email about: Opening hours")


def test_topic_tasks():
    email = get_task("email")
    # a replied-to mail is not the topic of a new email: the subject is
    assert email.training_pair(item("see you then", "Lunch Thursday?", input_from="quoted", subject="Re: Lunch"))[0] == \
        user("Write an email about: Lunch")
    assert email.training_pair(item("text", "budget meeting", input_from="row"))[0] == user("Write an email about: budget meeting")
    free = get_task("free")
    assert free.training_pair(item("They come and go.", title="Tides"))[0] == user("Write a text about: Tides")
    assert topic_of(item("the tide is high and the wind is fair today")) == "the tide is …"
    assert topic_of(item("Knots I love\n\nThe bowline, the hitch.")) == "Knots I love"


def test_paraphrase_inputs_are_made_by_the_given_generate():
    t = get_task("rewrite")
    items = [item("omg the harbor is SO pretty tonight"), item("same old same old"), item("ok", "already has one")]
    assert [t.needs_generated_input(i) for i in items] == [True, True, False]
    with pytest.raises(ValueError, match="make_inputs"):
        t.training_pair(items[0])
    with pytest.raises(ValueError, match="generate"):
        t.make_inputs(items)
    prompts = []

    def generate(messages: list) -> str:  # deterministic stand-in for the base model
        prompts.append(messages)
        text = messages[-1]["content"].rsplit("Text: ", 1)[1]
        return "Rewritten: The harbor looks pretty tonight.\n\nextra" if "harbor" in text else text  # 2nd: a copy

    made = t.make_inputs(items, generate)
    assert prompts[0] == paraphrase_messages("omg the harbor is SO pretty tonight")
    # the examples are earlier turns of the chat, answered; the text is the last user turn
    assert [m["role"] for m in prompts[0]] == ["user", "assistant", "user", "assistant", "user"]
    assert prompts[0][1]["content"] == PARAPHRASE_EXAMPLES[0][1] and prompts[0][-1]["content"].endswith("SO pretty tonight")
    assert [(m.input, m.meta.get("input_from")) for m in made] == [
        ("The harbor looks pretty tonight.", "generated"), ("same old same old", "generated-copy"), ("already has one", None)]
    assert t.training_pair(made[0]) == (
        user("Rewrite this text in my style, without any explanation before or after it:\n\nThe harbor looks pretty tonight."),
        "omg the harbor is SO pretty tonight")
    refused = t.make_inputs([items[0]], lambda p: "I'm sorry, I can't help with that.")
    assert refused[0].meta["input_from"] == "generated-copy"
    # an answer that repeats an example's rewrite answered the examples, not the text: not an input
    echoed = t.make_inputs([items[0]], lambda p: "It is raining again. This summer has been very bad. Nice harbor.")
    assert echoed[0].meta["input_from"] == "generated-copy" and echoes_example(" it is raining again this summer has been very bad")
    assert not echoes_example("The harbor looks pretty tonight.")
    # a looping answer stops at its first repeated sentence; one that says nothing but "not sure" is no input
    looped = t.make_inputs([items[0]], lambda p: "The harbor is pretty. It glows. The harbor is pretty. It glows. The harb")
    assert looped[0].input == "The harbor is pretty. It glows." and looped[0].meta["input_from"] == "generated"
    blank = t.make_inputs([items[0]], lambda p: "I'm not sure what to say. I'm not sure what to say. I'm not sure")
    assert blank[0].meta["input_from"] == "generated-copy"


def test_until_repeat_cuts_at_the_first_repeated_sentence():
    assert until_repeat("A b. C d! A b. E f? C d!") == "A b. C d!"
    assert until_repeat("I'm glad. I'm glad. I'm gl") == "I'm glad."
    assert until_repeat("I'm glad. Then I left") == "I'm glad. Then I left"  # a new cut-off sentence stays
    assert until_repeat("no sentence ends here") == "no sentence ends here"
    # loops() says when generating more cannot change that: a finished sentence repeated
    assert not loops("A b. C d. A b.") and loops("A b. C d. A b. ") and loops("A b. A b. x")
    full = "It glows. It is calm. It glows. It is calm. It gl"
    stopped = next(full[:n] for n in range(len(full) + 1) if loops(full[:n]))
    assert until_repeat(stopped) == until_repeat(full) == "It glows. It is calm."
    assert clean_generated("Rewritten: Fine. Fine.") == "Fine." and clean_generated("I'm not sure what to say.") == ""


def test_paraphrase_fingerprint_covers_prompt_and_cleaning(monkeypatch):
    first = registry.paraphrase_fingerprint()
    monkeypatch.setattr(registry, "PARAPHRASE_CLEANING", "other cleaning")
    assert registry.paraphrase_fingerprint() != first
    monkeypatch.undo()
    monkeypatch.setattr(registry, "PARAPHRASE_INSTRUCTION", "Say it plainly: ")
    assert registry.paraphrase_fingerprint() != first


def test_headline_without_article_is_dropped():
    t = get_task("headline")
    kept = t.make_inputs([item("Storm hits coast"), item("Tide record", "The tide set a record.")])
    assert [k.output for k in kept] == ["Tide record"]
    assert t.training_pair(kept[0])[0] == user("Generate a headline for the following article: The tide set a record.")
