"""cope_local.store: schema and migrations, WAL, private files, edit pairs, search, autosave."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import pytest

from cope_local import store as st
from cope_local.errors import CopeError
from cope_local.paths import home

MSG = [{"role": "user", "content": "Write a reply to this email:\n\nCan we meet Tuesday?"}]


def draft(s: st.Store, generated: str = "Sure, Tuesday works.", prompt: str = "Can we meet Tuesday?", **kw) -> int:
    return s.add_draft(prompt=prompt, task="email-reply", mode="cope", messages=MSG, generated=generated,
                       alpha=0.3, stop_reason="eos", **kw)


def test_new_store_is_current_wal_private_and_waits_for_locks():
    with st.open_store() as s:
        assert s.path == home() / "cope.db"
        assert s.version == st.SCHEMA_VERSION == 2
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.db.execute("PRAGMA busy_timeout").fetchone()[0] == st.BUSY_TIMEOUT_MS
        assert s.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        draft(s)
        for name in ("cope.db", "cope.db-wal", "cope.db-shm"):
            assert stat.S_IMODE(os.stat(home() / name).st_mode) == 0o600, name


def test_profile_store_lives_in_the_profile_folder():
    from tui_pilot import PERSONA

    from cope_local.profile import create_profile

    prof, _, _ = create_profile("ro", [PERSONA])
    assert st.store_path("ro") == prof.path / "cope.db"
    assert st.export_edit_pairs("ro") == []  # no store yet: nothing, and nothing created
    assert not (prof.path / "cope.db").exists()
    with st.open_store(prof) as s:
        s.save_draft(draft(s), "Tuesday it is!")
    pairs = st.export_edit_pairs("ro")
    assert [p["chosen"] for p in pairs] == ["Tuesday it is!"]
    assert st.export_edit_pairs(None) == []  # the profile-less store is another file


def test_migration_from_v1_keeps_the_data_and_indexes_it(tmp_path):
    path = tmp_path / "old.db"
    with st.Store(path, migrations=st.MIGRATIONS[:1]) as old:  # a store as schema 1 wrote it
        assert old.version == 1 and not old.has_fts
        draft(old, generated="The heron stood in the rain.")
        c = old.new_conversation("birds")
        old.add_message(c, "user", "tell me about cormorants")
        assert [h.kind for h in old.search("heron")] == ["draft"]  # schema 1 searches without FTS (LIKE)
    with st.Store(path) as new:
        assert new.version == 2 and new.has_fts
        assert [h.kind for h in new.search("heron")] == ["draft"]
        assert [h.kind for h in new.search("cormor")] == ["chat"]  # prefix match through FTS5


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(CopeError, match="newer cope-local"):
        st.Store(path)


def test_edit_pairs_one_per_draft_only_when_edited():
    with st.open_store() as s:
        d1 = draft(s)
        assert s.save_draft(d1, "Sure, Tuesday works.\n") is None  # unchanged but for whitespace: no pair
        assert s.count_pairs() == 0
        pid = s.save_draft(d1, "Tuesday? Perfect. -- Sam")
        assert s.save_draft(d1, "Tuesday? Perfect! -- Sam") == pid  # edited again: same pair, updated
        d2 = draft(s, generated="No.", prompt="Lunch?")
        s.save_draft(d2, "Happy to, 12:30?")
        pairs = st.export_edit_pairs()
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
            ("Can we meet Tuesday?", "Tuesday? Perfect! -- Sam", "Sure, Tuesday works."),
            ("Lunch?", "Happy to, 12:30?", "No.")]
        assert pairs[0]["messages"] == MSG and pairs[0]["task"] == "email-reply"
        assert pairs[0]["rejected_stop_reason"] == "eos" and pairs[0]["draft_id"] == d1
        s.save_draft(d1, "Sure, Tuesday works.")  # edited back to the model's text: no preference left
        assert [p["draft_id"] for p in st.export_edit_pairs()] == [d2]
        assert s.get_draft(d1)["final"] == "Sure, Tuesday works." and s.get_draft(d1)["saved"]


def test_search_drafts_and_chats_newest_first():
    with st.open_store() as s:
        draft(s, generated="Meet at the café near the harbour?", created="2026-01-01T10:00:00+00:00")
        c = s.new_conversation("Harbour plans", created="2026-01-02T10:00:00+00:00")
        s.add_message(c, "user", "where is the best harbour walk?", created="2026-01-02T10:00:00+00:00")
        s.add_message(c, "assistant", "Along the north pier.", created="2026-01-02T10:00:01+00:00")
        hits = s.search("harb")
        assert [(h.kind, h.id) for h in hits] == [("chat", c), ("draft", 1)]  # one hit per chat, newest first
        assert "\x02" in hits[1].snippet  # the match is marked for highlighting
        assert [h.kind for h in s.search("cafe")] == ["draft"]  # diacritics folded
        assert s.search("pier harbour")[0].kind == "chat"  # all words, across messages of the hit
        assert s.search('"; DROP TABLE drafts; --') == []  # quotes and operators are just text
        assert len(s.search("")) == 2  # no words: the most recent of both kinds
        s.delete_conversation(c)
        assert [h.kind for h in s.search("harbour")] == ["draft"]


def test_conversations_keep_their_turns_in_order():
    with st.open_store() as s:
        c = s.new_conversation("  a very long first message " * 5)
        assert len(s.conversation(c)["title"]) <= 60
        for i in range(3):
            s.add_message(c, "user", f"q{i}")
            s.add_message(c, "assistant", f"a{i}")
        conv = s.conversation(c)
        assert [m["content"] for m in conv["messages"]] == ["q0", "a0", "q1", "a1", "q2", "a2"]
        assert s.conversations()[0]["n_messages"] == 6


def test_autosave_survives_a_second_connection_and_threads():
    with st.open_store() as a, st.open_store() as b:  # e.g. the TUI and a second terminal
        a.autosave("draft.input", "half a sentence")
        assert b.restore("draft.input") == "half a sentence"
        assert b.restore("missing", "x") == "x"

        def write(i):
            for j in range(20):
                a.autosave(f"k{i}", str(j))

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [b.restore(f"k{i}") for i in range(4)] == ["19"] * 4
