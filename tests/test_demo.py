"""`cope demo`, the README's main job: trains the invented persona and drafts in her voice, offline."""

from __future__ import annotations

import json

from cope_local.cli import main


def uppercase_share(texts) -> float:
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def test_demo_trains_the_persona_and_her_voice_shows(monkeypatch, pytestconfig, capsys, no_network):
    monkeypatch.setenv("COPE_CACHE", str(pytestconfig.cache.mkdir("cope-train-cache")))
    assert main(["demo", "--json", "--max-tokens", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in out["stages"] if s["status"] == "ran"] == ["inputs", "pairs", "sft", "export", "activate"]
    rows = out["drafts"]
    assert len(rows) == 3 and all(row[m] for row in rows for m in ("base", "user", "cope"))
    assert all(row["user"] != row["base"] for row in rows)
    # Ro writes all lowercase: the adapter's drafts are far less capitalised than the base model's
    base, user = uppercase_share(r["base"] for r in rows), uppercase_share(r["user"] for r in rows)
    assert user < 0.5 * base, (base, user)
    # a second run reuses the trained profile
    assert main(["demo", "--json", "--max-tokens", "8"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(s["status"] in ("skipped", "off") for s in again["stages"])
