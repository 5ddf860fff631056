"""Drafts, chats, edit pairs and autosaved input: one SQLite file per profile.

    <profile folder>/cope.db      with a profile
    home()/cope.db                without one (base-model drafts; also the TUI's own settings)

Tables (PRAGMA user_version is the schema version; MIGRATIONS[v] takes v to v+1):
    drafts         one row per generated draft: prompt, task, mode, alpha, the chat messages the
                   decoder saw (JSON), generated text, the user's final text once saved
    conversations  one row per chat; messages(conversation_id, role, content) holds the turns
    pairs          learn-from-edits: (messages JSON, chosen = the user's edit, rejected = what the
                   model generated), one per draft (draft_id UNIQUE), read by training through
                   export_edit_pairs()
    autosave       key -> text (the TUI's input boxes and settings), written as the user types
    search         FTS5 index (v2), kept by triggers: one document per draft (rowid 2*id: prompt
                   and text) and per chat (rowid 2*id + 1: title and every turn, so words from
                   different turns find it). Without FTS5 in the sqlite build, search() falls
                   back to LIKE.

Why SQLite: the TUI, a training run and a second terminal may all touch one profile; WAL lets
readers and one writer work at once and busy_timeout waits out short locks instead of failing.
The file and its -wal/-shm companions are 0600 (SQLite gives them the database's mode).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cope_local.errors import CopeError
from cope_local.paths import home

DB_NAME = "cope.db"
BUSY_TIMEOUT_MS = 5000  # wait this long for another process's write lock before giving up


def now() -> str:
    """ISO 8601 UTC, seconds: sorts as text."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# ---- schema -----------------------------------------------------------------------------------

def _script(db: sqlite3.Connection, sql: str) -> None:
    """Run several statements inside the caller's transaction (executescript would COMMIT it first)."""
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            db.execute(buf)
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:60]}")


def _v1(db: sqlite3.Connection) -> None:
    _script(db, """
        CREATE TABLE drafts (
            id INTEGER PRIMARY KEY,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            task TEXT NOT NULL,
            mode TEXT NOT NULL,           -- cope | user | base
            alpha REAL,
            prompt TEXT NOT NULL,         -- what the user typed
            messages TEXT NOT NULL,       -- JSON chat messages given to the decoder
            generated TEXT NOT NULL,      -- what the model wrote
            stop_reason TEXT,             -- eos | length | stop | context | stopped (Esc)
            final TEXT,                   -- the user's text when saved (NULL: never saved)
            saved TEXT,                   -- when it was last saved
            model TEXT,
            adapter TEXT
        );
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            title TEXT NOT NULL,
            mode TEXT,
            alpha REAL,
            adapter TEXT
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,           -- user | assistant
            content TEXT NOT NULL,
            created TEXT NOT NULL
        );
        CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
        CREATE TABLE pairs (
            id INTEGER PRIMARY KEY,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            draft_id INTEGER UNIQUE REFERENCES drafts(id) ON DELETE SET NULL,
            task TEXT NOT NULL,
            prompt TEXT NOT NULL,         -- what the user typed (the draft's prompt)
            messages TEXT NOT NULL,       -- JSON chat messages (the prompt), as the decoder saw them
            chosen TEXT NOT NULL,         -- the user's edited text
            rejected TEXT NOT NULL,       -- the generated text
            rejected_stop_reason TEXT     -- 'stopped': the user cut the generation short
        );
        CREATE TABLE autosave (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated TEXT NOT NULL
        );
    """)


def _v2(db: sqlite3.Connection) -> None:
    """Full-text search: one document per draft (prompt + text) and per chat (title + every turn).

    Skipped where sqlite lacks FTS5 (search() then falls back to LIKE)."""
    if not fts5_available(db):
        return
    chat_doc = ("SELECT 2 * c.id + 1, c.title || char(10) || coalesce((SELECT group_concat(m.content, char(10))"
                " FROM messages m WHERE m.conversation_id = c.id), '') FROM conversations c WHERE c.id = {id}")
    _script(db, f"""
        CREATE VIRTUAL TABLE search USING fts5(body, tokenize = 'unicode61 remove_diacritics 2');
        CREATE TRIGGER drafts_ai AFTER INSERT ON drafts BEGIN
            INSERT INTO search(rowid, body) VALUES (2 * new.id, new.prompt || char(10) || coalesce(new.final, new.generated));
        END;
        CREATE TRIGGER drafts_au AFTER UPDATE ON drafts BEGIN
            DELETE FROM search WHERE rowid = 2 * old.id;
            INSERT INTO search(rowid, body) VALUES (2 * new.id, new.prompt || char(10) || coalesce(new.final, new.generated));
        END;
        CREATE TRIGGER drafts_ad AFTER DELETE ON drafts BEGIN
            DELETE FROM search WHERE rowid = 2 * old.id;
        END;
        CREATE TRIGGER conversations_ai AFTER INSERT ON conversations BEGIN
            INSERT INTO search(rowid, body) {chat_doc.format(id="new.id")};
        END;
        CREATE TRIGGER conversations_ad AFTER DELETE ON conversations BEGIN
            DELETE FROM search WHERE rowid = 2 * old.id + 1;
        END;
        CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
            DELETE FROM search WHERE rowid = 2 * new.conversation_id + 1;
            INSERT INTO search(rowid, body) {chat_doc.format(id="new.conversation_id")};
        END;
        CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
            DELETE FROM search WHERE rowid = 2 * old.conversation_id + 1;
            INSERT INTO search(rowid, body) {chat_doc.format(id="old.conversation_id")};
        END;
        INSERT INTO search(rowid, body) SELECT 2 * id, prompt || char(10) || coalesce(final, generated) FROM drafts;
        INSERT INTO search(rowid, body) {chat_doc.format(id="c.id")};
    """)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


def fts5_available(db: sqlite3.Connection) -> bool:
    try:
        db.execute("CREATE VIRTUAL TABLE temp._fts5_probe USING fts5(x)")
        db.execute("DROP TABLE temp._fts5_probe")
        return True
    except sqlite3.OperationalError:
        return False


# ---- records ----------------------------------------------------------------------------------

@dataclass
class Hit:
    kind: str  # "draft" | "chat"
    id: int  # draft id or conversation id
    created: str  # a draft's creation, a chat's last turn
    title: str  # the draft's prompt or the chat's title
    snippet: str  # matched text with the match between \x02 and \x03 (FTS), else the start


# ---- the store --------------------------------------------------------------------------------

class Store:
    """One SQLite database; safe to share between the UI thread and workers (one lock)."""

    def __init__(self, path: str | os.PathLike, *, migrations: list | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():  # create it 0600 before sqlite does (its -wal/-shm copy the mode)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                      check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            self.db.execute("PRAGMA foreign_keys = ON")
            self.migrate(MIGRATIONS if migrations is None else migrations)
        except sqlite3.DatabaseError as exc:
            raise CopeError(f"{self.path}: cannot open the database ({exc}); move the file aside to start afresh") from None
        self.has_fts = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'search'").fetchone() is not None

    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, migrations: list) -> None:
        """Bring the schema to len(migrations), each step in its own transaction."""
        with self._lock:
            if self.version > len(MIGRATIONS):
                raise CopeError(f"{self.path}: written by a newer cope-local (schema {self.version}, this one knows "
                                f"{len(MIGRATIONS)}); upgrade cope-local")
            while self.version < len(migrations):
                v = self.version
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    if self.version == v:  # another process may have migrated while we waited
                        migrations[v](self.db)
                        self.db.execute(f"PRAGMA user_version = {v + 1}")
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self, sql: str, args=()) -> sqlite3.Cursor:
        with self._lock:
            return self.db.execute(sql, args)

    def _rows(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    # ---- drafts -------------------------------------------------------------------------------
    def add_draft(self, *, prompt: str, task: str, mode: str, messages: list, generated: str,
                  alpha: float | None = None, stop_reason: str | None = None, model: str | None = None,
                  adapter: str | None = None, created: str | None = None) -> int:
        """Record a generated draft (not yet saved by the user) -> its id."""
        t = created or now()
        cur = self._write(
            "INSERT INTO drafts(created, updated, task, mode, alpha, prompt, messages, generated, stop_reason, model, adapter)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (t, t, task, mode, alpha, prompt, json.dumps(messages, ensure_ascii=False), generated, stop_reason,
             model, adapter))
        return int(cur.lastrowid)

    def save_draft(self, draft_id: int, final: str) -> int | None:
        """The user keeps `final` for this draft. If it differs from what the model generated, keep
        (prompt, chosen = final, rejected = generated) as the draft's one preference pair -> the pair id."""
        with self._lock:
            d = self.get_draft(draft_id)
            t = now()
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("UPDATE drafts SET final = ?, saved = ?, updated = ? WHERE id = ?", (final, t, t, draft_id))
                pair_id = None
                if final.strip() and final.strip() != d["generated"].strip():
                    self.db.execute(
                        "INSERT INTO pairs(created, updated, draft_id, task, prompt, messages, chosen, rejected, rejected_stop_reason)"
                        " VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(draft_id) DO UPDATE SET chosen = excluded.chosen,"
                        " updated = excluded.updated",
                        (t, t, draft_id, d["task"], d["prompt"], json.dumps(d["messages"], ensure_ascii=False), final, d["generated"],
                         d["stop_reason"]))
                    pair_id = int(self.db.execute("SELECT id FROM pairs WHERE draft_id = ?", (draft_id,)).fetchone()[0])
                else:  # edited back to what the model wrote: no preference left to learn
                    self.db.execute("DELETE FROM pairs WHERE draft_id = ?", (draft_id,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return pair_id

    def get_draft(self, draft_id: int) -> dict:
        rows = self._rows("SELECT * FROM drafts WHERE id = ?", (draft_id,))
        if not rows:
            raise CopeError(f"{self.path}: no draft {draft_id}")
        d = rows[0]
        d["messages"] = json.loads(d["messages"])
        return d

    def drafts(self, limit: int = 50) -> list[dict]:
        return self._rows("SELECT id, created, task, mode, prompt, generated, final, saved FROM drafts"
                          " ORDER BY id DESC LIMIT ?", (limit,))

    # ---- chats --------------------------------------------------------------------------------
    def new_conversation(self, title: str, *, mode: str | None = None, alpha: float | None = None,
                         adapter: str | None = None, created: str | None = None) -> int:
        t = created or now()
        cur = self._write("INSERT INTO conversations(created, updated, title, mode, alpha, adapter) VALUES (?,?,?,?,?,?)",
                          (t, t, _title(title), mode, alpha, adapter))
        return int(cur.lastrowid)

    def add_message(self, conversation_id: int, role: str, content: str, created: str | None = None) -> int:
        t = created or now()
        with self._lock:
            cur = self.db.execute("INSERT INTO messages(conversation_id, role, content, created) VALUES (?,?,?,?)",
                                  (conversation_id, role, content, t))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (t, conversation_id))
            return int(cur.lastrowid)

    def conversation(self, conversation_id: int) -> dict:
        rows = self._rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise CopeError(f"{self.path}: no conversation {conversation_id}")
        conv = rows[0]
        conv["messages"] = self._rows("SELECT role, content, created FROM messages WHERE conversation_id = ? ORDER BY id",
                                      (conversation_id,))
        return conv

    def conversations(self, limit: int = 100) -> list[dict]:
        return self._rows("SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages"
                          " FROM conversations c ORDER BY updated DESC, id DESC LIMIT ?", (limit,))

    def delete_conversation(self, conversation_id: int) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            self.db.execute("COMMIT")

    # ---- pairs --------------------------------------------------------------------------------
    def pairs(self) -> list[dict]:
        """Edit pairs, oldest first: id, created, updated, task, prompt (what the user typed), messages
        (list, the chat prompt the decoder saw), chosen, rejected, rejected_stop_reason, draft_id."""
        out = []
        for r in self._rows("SELECT * FROM pairs ORDER BY id"):
            r["messages"] = json.loads(r["messages"])
            out.append(r)
        return out

    def count_pairs(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT count(*) FROM pairs").fetchone()[0])

    # ---- autosave -----------------------------------------------------------------------------
    def autosave(self, key: str, value: str) -> None:
        """Keep `value` under `key` at once (WAL: a cheap append), so a crash loses nothing."""
        self._write("INSERT INTO autosave(key, value, updated) VALUES (?,?,?) ON CONFLICT(key) DO UPDATE SET"
                    " value = excluded.value, updated = excluded.updated", (key, value, now()))

    def restore(self, key: str, default: str | None = None) -> str | None:
        rows = self._rows("SELECT value FROM autosave WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    # ---- search -------------------------------------------------------------------------------
    def search(self, query: str, limit: int = 50) -> list[Hit]:
        """Drafts and chats matching every word of `query` (prefixes too), newest first; all when empty."""
        words = re.findall(r"\w+", query or "")
        if not words:
            return self._recent(limit)
        with self._lock:
            if self.has_fts:
                match = " ".join('"' + w.replace('"', "") + '"*' for w in words)
                rows = self.db.execute(
                    "SELECT rowid, snippet(search, 0, char(2), char(3), '…', 10) AS snip FROM search"
                    " WHERE search MATCH ? ORDER BY rowid DESC LIMIT ?", (match, limit)).fetchall()
                found = [(int(r["rowid"]), r["snip"]) for r in rows]
            else:
                cond = " AND ".join(["body LIKE ?"] * len(words))
                args = [f"%{w}%" for w in words]
                rows = self.db.execute(
                    f"SELECT rowid, body FROM (SELECT 2 * id AS rowid, prompt || char(10) || coalesce(final, generated) AS body"
                    f" FROM drafts UNION ALL SELECT 2 * c.id + 1, c.title || char(10) || coalesce((SELECT"
                    f" group_concat(m.content, char(10)) FROM messages m WHERE m.conversation_id = c.id), '')"
                    f" FROM conversations c) WHERE {cond} ORDER BY rowid DESC LIMIT ?", (*args, limit)).fetchall()
                found = [(int(r["rowid"]), _flat(r["body"])[:120]) for r in rows]
        hits: list[Hit] = []
        for rowid, snip in found:
            if rowid % 2 == 0:
                d = self._rows("SELECT id, created, prompt FROM drafts WHERE id = ?", (rowid // 2,))
                if d:
                    hits.append(Hit("draft", d[0]["id"], d[0]["created"], _flat(d[0]["prompt"]), _flat(snip)))
            else:
                c = self._rows("SELECT id, updated, title FROM conversations WHERE id = ?", (rowid // 2,))
                if c:
                    hits.append(Hit("chat", c[0]["id"], c[0]["updated"], c[0]["title"], _flat(snip)))
        hits.sort(key=lambda h: h.created, reverse=True)
        return hits[:limit]

    def _recent(self, limit: int) -> list[Hit]:
        hits = [Hit("draft", d["id"], d["created"], _flat(d["prompt"]), _flat(d["final"] or d["generated"])[:120])
                for d in self.drafts(limit)]
        hits += [Hit("chat", c["id"], c["updated"], c["title"], f"{c['n_messages']} messages")
                 for c in self.conversations(limit)]
        hits.sort(key=lambda h: (h.created, h.id), reverse=True)
        return hits[:limit]


def _flat(text: str | None) -> str:
    return " ".join((text or "").split())


def _title(text: str) -> str:
    flat = _flat(text)
    return flat if len(flat) <= 60 else flat[:59] + "…"


# ---- where stores live ----------------------------------------------------------------------

def store_path(profile=None) -> Path:
    """cope.db in the profile's folder (name or Profile), or in home() when `profile` is None."""
    if profile is None:
        return home() / DB_NAME
    from cope_local.profile import load_profile

    return load_profile(profile).path / DB_NAME


def open_store(profile=None) -> Store:
    """The store of a profile (name or Profile), or the profile-less one in home(); created and migrated on first use."""
    return Store(store_path(profile))


def export_edit_pairs(profile=None) -> list[dict]:
    """Preference pairs learnt from the user's edits, oldest first, for DPO:

        {"id", "created", "updated", "task", "prompt" (what the user typed),
         "messages": [{"role", "content"}...] (the chat prompt as the decoder saw it: task template applied),
         "chosen" (the user's edit), "rejected" (the generated text),
         "rejected_stop_reason" ("stopped" when the user cut generation short), "draft_id"}

    `profile` is a name or Profile; None reads the profile-less store in home(). No store yet: [].
    """
    path = store_path(profile)
    if not path.exists():
        return []
    with Store(path) as store:
        return store.pairs()
