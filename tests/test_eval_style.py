"""The style metric: character n-gram authorship attribution and the length ratio."""

from __future__ import annotations

import pytest

from cope_local.eval.style import Attributor, char_ngrams, length_ratio

LOWER = ["lol yeah im so tired today  going to bed early", "omg the cat did it again lol", "cant wait for friday  beach!!",
         "lol no way thats hilarious", "ugh mondays  need coffee lol", "yay pizza night with the crew!!",
         "lol my phone died again  so annoying", "soooo hungry rn  tacos?"]
FORMAL = ["Thank you for the kind invitation. I shall attend.", "Please find the report attached. Regards, J.",
          "I appreciate your prompt reply. Best regards.", "The meeting is confirmed for Tuesday at 10:00.",
          "Kindly review the enclosed document at your convenience.", "I look forward to our discussion. Regards, J.",
          "Thank you. The figures have been updated accordingly.", "Please advise whether Thursday suits you."]
TAGS = ["Great run this morning #fitness #running :)", "New PB today!! #marathon #goals :D",
        "Rest day, stretching only #recovery :)", "Hill repeats done #training #fitness",
        "Signed up for the half! #running #excited :D", "Rainy 10k, still smiling #running :)",
        "Long run Sunday #marathon #fitness", "Foam roller is my friend #recovery :)"]


def test_char_ngrams_keep_case_and_spacing():
    grams = char_ngrams("Hi  x", orders=(2,))
    assert grams[" H"] == 1 and grams["  "] == 1 and grams["Hi"] == 1 and "hi" not in grams


def test_held_out_texts_go_to_their_authors_and_garbage_goes_nowhere_in_particular():
    users = {"low": LOWER, "formal": FORMAL, "tags": TAGS}
    model = Attributor({u: texts[:6] for u, texts in users.items()})
    held_out = [(u, t) for u, texts in users.items() for t in texts[6:]]
    assert sum(model.correct(u, t) for u, t in held_out) == len(held_out) == 6
    assert model.attribute("lol so tired  need coffee") == "low"
    assert model.attribute("Kindly advise. Regards, J.") == "formal"
    assert model.attribute("") == ""  # no features: nobody's
    s = model.scores("New PB #running :)")
    assert s.shape == (3,) and model.users[int(s.argmax())] == "tags" and s.max() <= 1.0 + 1e-9
    with pytest.raises(ValueError, match="two users"):
        Attributor({"only": LOWER})


def test_length_ratio():
    assert length_ratio("a b c", "a b c d e f") == 0.5
    assert length_ratio("a b", "") == 2.0
