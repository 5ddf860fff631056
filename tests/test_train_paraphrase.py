"""Paraphrased inputs made by the real default model: answers to the text, not to the prompt's examples."""

from __future__ import annotations

from cope_local.tasks import clean_generated, echoes_example, get_task, paraphrase_messages
from cope_local.train.paraphrase import Paraphraser

# Invented tweets. With both examples inside one user message, SmolLM2-135M answered 3 of these with an
# example's rewrite ("It's raining again. This summer has been..."); with the examples as chat turns, none.
TWEETS = [
    "@sam_k LOL yep! im with you there, so hard to keep up with everything this week",
    "@jo_bee not yet  sad there's no party friday  maybe next week",
    "ugh mondays... coffee machine broke AGAIN at work",
    "@marco88 haha i know right  we should totally go back there soon",
    "cant sleep. too hot and the neighbours dog wont stop barking",
    "@lily_p aww thanks hun  you made my day xx",
    "watching the match with dad  come on boys!!",
    "@tomtom  i miss you already  when are you back?",
    "just got my exam results... passed everything!!! so happy",
    "@nina_r lol that is so you  i cant even",
    "rain rain go away  i want to go to the beach",
    "@dave_w  good luck tomorrow mate, you'll smash it",
]


def test_the_base_model_paraphrases_the_text_not_the_examples(default_model, tmp_path, no_network):
    with Paraphraser(default_model, tmp_path / "cache.jsonl", progress=False) as para:
        answers = [clean_generated(para(paraphrase_messages(t))) for t in TWEETS]
    assert not [a for a in answers if echoes_example(a)], answers
    assert sum(bool(a) for a in answers) >= 9, answers  # an empty answer (the model refused) falls back to the text
    # the answers are cached by their chat: a second Paraphraser makes none anew, and make_inputs uses them
    from cope_local.ingest.items import HistoryItem

    items = [HistoryItem(id=str(i), input=None, output=t, source="test") for i, t in enumerate(TWEETS)]
    with Paraphraser(default_model, tmp_path / "cache.jsonl", progress=False) as again:
        made = get_task("lamp7").make_inputs(items, again)
        assert again.decoder is None  # every answer came from the cache
    assert [m.input for m in made if m.meta["input_from"] == "generated"] == [a for a in answers if a]
