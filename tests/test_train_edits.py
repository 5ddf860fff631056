"""Learning from edits: the user's saved edits become DPO pairs that update and activate the adapter."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from cope_local import profile as profiles
from cope_local.cli import main
from cope_local.store import Store, store_path
from cope_local.tasks import get_task
from cope_local.train.edits import select_pairs

PERSONA = files("cope_local").joinpath("data/persona/history.jsonl")

EDITS = [  # (what the user asked, what the model drafted, what the user saved)
    ("Can you fix the jib by Friday?", "Dear customer, we will repair the jib by Friday. Kind regards.",
     "yep, jib's on the bench. friday, promise. fair winds, —ro"),
    ("Is the boat ready for the race?", "Hello, the boat is ready for the race. Best regards.",
     "she's ready. rigged and tuned, go win it. —ro"),
    ("Thanks for the quick repair!", "You are welcome. Thank you for choosing our services.",
     "anytime! tell the crew i said hi. —ro"),
    ("Do you sell new sails?", "Yes, we sell new sails.", "Yes, we sell new sails."),  # saved unchanged: no pair
]


def test_select_pairs_keeps_real_edits_and_says_why_others_go():
    pairs = [{"chosen": "a b", "rejected": "a  b"}, {"chosen": "", "rejected": "x"},
             {"chosen": "hello there friend", "rejected": "hello there", "rejected_stop_reason": "stopped"},
             {"chosen": "hi!", "rejected": "Dear Sir", "rejected_stop_reason": "eos"}]
    kept, skipped = select_pairs(pairs)
    assert kept == [pairs[3]]
    assert skipped == {"unchanged": 1, "empty": 1, "continued": 1}


def save_edits(profile: str, edits) -> None:
    task = get_task("email-reply")
    with Store(store_path(profile)) as store:
        for prompt, generated, final in edits:
            draft_id = store.add_draft(prompt=prompt, task=task.name, mode="cope", messages=task.draft_messages(prompt),
                                       generated=generated, stop_reason="eos")
            store.save_draft(draft_id, final)


def test_from_edits_trains_verifies_and_activates(default_model, tmp_path, monkeypatch, pytestconfig, capsys):
    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    history = tmp_path / "ro.jsonl"
    history.write_text("\n".join(PERSONA.read_text(encoding="utf-8").splitlines()[:8]) + "\n", encoding="utf-8")
    p, _, _ = profiles.create_profile("ro", [history], task="email-reply")

    # no trained adapter yet: a clear error, nothing written
    assert main(["profile", "train", "ro", "--from-edits"]) == 2
    assert "train it first" in capsys.readouterr().err

    assert main(["profile", "train", "ro", "--max-steps", "1", "--set", "dpo=false", "--set", "max_target_tokens=32"]) == 0
    before = profiles.active_adapter("ro")
    assert before is not None

    save_edits("ro", EDITS[2:])  # one real edit + one unchanged: too few
    capsys.readouterr()
    assert main(["profile", "train", "ro", "--from-edits"]) == 2
    err = capsys.readouterr().err
    assert "1 usable edit pairs, need at least 3" in err and str(store_path("ro")) in err
    assert profiles.active_adapter("ro") == before

    save_edits("ro", EDITS[:2])
    assert main(["profile", "train", "ro", "--from-edits", "--json", "--max-steps", "2"]) == 0
    info = json.loads(capsys.readouterr().out)["edits"]
    assert info["pairs"] == 3 and info["skipped"] == {}
    assert info["steps"] == 2
    assert info["margin_before"] == pytest.approx(0.0, abs=1e-6)  # reference = the starting adapter
    assert info["margin_after"] > 0.0  # the edits are now preferred to the drafts
    after = profiles.active_adapter("ro")
    assert after != before and after.exists() and before.exists()  # the previous adapter is kept to go back
    assert Path(info["adapter"]).name == after.name

    from cope_local.gguf_file import read_header

    meta = read_header(after, what="adapter").values
    assert meta["cope.train.edit_pairs"] == 3

    # nothing new: nothing to do, the same adapter stays active
    assert main(["profile", "train", "ro", "--from-edits", "--max-steps", "2"]) == 0
    assert "up to date" in capsys.readouterr().err
    assert profiles.active_adapter("ro") == after
