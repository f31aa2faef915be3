"""The journal: applies and their changes in SQLite under the state directory.

Holds outcomes, durations and error messages, never specs (so never userData). The
daemon adds its own record here: its state (source, applied and attempted revisions),
each resource's last state, events, and suspensions (which `reconciler suspend` writes
and the daemon reads).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from reconciler.errors import JournalError

SCHEMA = """
CREATE TABLE IF NOT EXISTS applies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL,
    source TEXT,
    revision TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    duration_s REAL,
    outcome TEXT,
    created INTEGER DEFAULT 0,
    updated INTEGER DEFAULT 0,
    replaced INTEGER DEFAULT 0,
    deleted INTEGER DEFAULT 0,
    orphaned INTEGER DEFAULT 0,
    failed INTEGER DEFAULT 0,
    skipped INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS changes (
    apply_id INTEGER NOT NULL REFERENCES applies(id),
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    duration_s REAL,
    finished_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_resource ON changes(kind, tenant, name, apply_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    level TEXT NOT NULL,
    reason TEXT NOT NULL,
    resource TEXT,
    message TEXT NOT NULL,
    revision TEXT
);
CREATE TABLE IF NOT EXISTS daemon (
    name TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    revision TEXT,
    detail TEXT,
    error TEXT,
    next_retry TEXT,
    failures INTEGER DEFAULT 0,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, tenant, name)
);
CREATE TABLE IF NOT EXISTS suspensions (
    target TEXT PRIMARY KEY,
    since TEXT NOT NULL
);
"""

#: columns added after the first release: (table, column, definition)
MIGRATIONS = (("applies", "pid", "INTEGER"),)

#: events kept (older ones are pruned as new ones come)
EVENTS_KEPT = 1000

#: seconds a call waits for another process's lock on the journal before it gives up
LOCK_WAIT_S = 10.0


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class ResourceState:
    """A resource as the daemon last left it."""

    kind: str
    tenant: str
    name: str
    state: str
    revision: str | None = None
    detail: str = ""
    error: str | None = None
    next_retry: str | None = None
    failures: int = 0
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class LastChange:
    apply_id: int
    action: str
    outcome: str
    error: str | None
    finished_at: str


class Journal:
    """Append-only record of applies. One connection per call: safe across threads."""

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.path = Path(state_dir) / "journal.sqlite3"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the state directory {self.path.parent}: {exc.strerror}") from None
        with self._db() as db, db:
            db.executescript(SCHEMA)
            for table, column, definition in MIGRATIONS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=LOCK_WAIT_S)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection for one call; SQLite's errors become a JournalError that says what
        is wrong (locked by another process, disk full) instead of a traceback."""
        try:
            with closing(self._connect()) as db:
                yield db
        except sqlite3.Error as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                why = f"is locked by another process (waited {LOCK_WAIT_S:g} s): {text}"
            elif "full" in text:
                why = f"cannot be written: {text} (free space on {self.path.parent}'s file system)"
            else:
                why = f"cannot be used: {text}"
            raise JournalError(f"the journal {self.path} {why}") from None

    def begin(self, command: str, source: str | None = None, revision: str | None = None) -> int:
        with self._db() as db, db:
            cur = db.execute(
                "INSERT INTO applies (command, source, revision, started_at, pid) VALUES (?, ?, ?, ?, ?)",
                (command, source, revision, now_iso(), os.getpid()),
            )
            return int(cur.lastrowid or 0)

    def close_abandoned(self) -> int:
        """Applies whose process died before finishing (SIGKILL, a crash) are closed as
        `interrupted`: their recorded changes stand, the rest never happened. Returns how
        many were closed."""
        with self._db() as db, db:
            rows = db.execute("SELECT id, pid FROM applies WHERE finished_at IS NULL").fetchall()
            dead = [r["id"] for r in rows if r["pid"] is None or not pid_alive(int(r["pid"]))]
            db.executemany("UPDATE applies SET finished_at=?, outcome='interrupted' WHERE id=?",
                           [(now_iso(), i) for i in dead])
        return len(dead)

    def record_change(self, apply_id: int, kind: str, tenant: str, name: str, action: str,
                      outcome: str, error: str | None, duration_s: float) -> None:
        with self._db() as db, db:
            db.execute(
                "INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (apply_id, kind, tenant, name, action, outcome, error, duration_s, now_iso()),
            )

    def finish(self, apply_id: int, outcome: str, duration_s: float, counts: dict[str, int]) -> None:
        cols = ("created", "updated", "replaced", "deleted", "orphaned", "failed", "skipped")
        with self._db() as db, db:
            db.execute(
                f"UPDATE applies SET finished_at=?, outcome=?, duration_s=?, "
                f"{', '.join(f'{c}=?' for c in cols)} WHERE id=?",
                (now_iso(), outcome, duration_s, *(counts.get(c, 0) for c in cols), apply_id),
            )

    def applies(self, limit: int = 10) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM applies ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def last_source(self) -> str | None:
        with self._db() as db:
            row = db.execute(
                "SELECT source FROM applies WHERE source IS NOT NULL AND command = 'apply' "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
        return row["source"] if row else None

    def changes_of(self, apply_id: int) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM changes WHERE apply_id = ? ORDER BY rowid", (apply_id,)).fetchall()
        return [dict(r) for r in rows]

    # --- the daemon ---------------------------------------------------------------------

    def event(self, level: str, reason: str, message: str, resource: str | None = None,
              revision: str | None = None) -> None:
        with self._db() as db, db:
            cur = db.execute(
                "INSERT INTO events (at, level, reason, resource, message, revision) VALUES (?, ?, ?, ?, ?, ?)",
                (now_iso(), level, reason, resource, message, revision),
            )
            if (cur.lastrowid or 0) % 100 == 0:
                db.execute("DELETE FROM events WHERE id <= ?", (int(cur.lastrowid or 0) - EVENTS_KEPT,))

    def events(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def set_daemon(self, **values: Any) -> None:
        """Record daemon facts (JSON values; None removes one)."""
        with self._db() as db, db:
            for name, value in values.items():
                if value is None:
                    db.execute("DELETE FROM daemon WHERE name = ?", (name,))
                else:
                    db.execute("INSERT OR REPLACE INTO daemon (name, value) VALUES (?, ?)",
                               (name, json.dumps(value)))

    def daemon(self) -> dict[str, Any]:
        with self._db() as db:
            rows = db.execute("SELECT name, value FROM daemon").fetchall()
        return {r["name"]: json.loads(r["value"]) for r in rows}

    def set_resources(self, states: Iterable[ResourceState], *, replace: bool = False) -> None:
        """Record resource states (with `replace`, these are all there are)."""
        rows = [(s.kind, s.tenant, s.name, s.state, s.revision, s.detail, s.error, s.next_retry,
                 s.failures, s.updated_at or now_iso()) for s in states]
        with self._db() as db, db:
            if replace:
                db.execute("DELETE FROM resources")
            db.executemany("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def resources(self) -> dict[tuple[str, str, str], ResourceState]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM resources").fetchall()
        return {(r["kind"], r["tenant"], r["name"]): ResourceState(**dict(r)) for r in rows}

    def suspend(self, target: str) -> bool:
        """Suspend a target ("*", a tenant, or KIND/TENANT/NAME); False if it already was."""
        with self._db() as db, db:
            cur = db.execute("INSERT OR IGNORE INTO suspensions (target, since) VALUES (?, ?)",
                             (target, now_iso()))
            return cur.rowcount > 0

    def resume(self, target: str) -> bool:
        with self._db() as db, db:
            return db.execute("DELETE FROM suspensions WHERE target = ?", (target,)).rowcount > 0

    def suspensions(self) -> dict[str, str]:
        """Suspended target -> since when."""
        with self._db() as db:
            rows = db.execute("SELECT target, since FROM suspensions ORDER BY target").fetchall()
        return {r["target"]: r["since"] for r in rows}

    def last_changes(self) -> dict[tuple[str, str, str], LastChange]:
        """The latest recorded change of every resource."""
        with self._db() as db:
            rows = db.execute(
                "SELECT c.* FROM changes c JOIN (SELECT kind, tenant, name, MAX(rowid) AS r "
                "FROM changes GROUP BY kind, tenant, name) m ON c.rowid = m.r"
            ).fetchall()
        return {
            (r["kind"], r["tenant"], r["name"]): LastChange(
                r["apply_id"], r["action"], r["outcome"], r["error"], r["finished_at"]
            )
            for r in rows
        }


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: nothing may reap it here, and
    `kill -0` succeeds on a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # the state follows the command name, which is in parentheses and may hold spaces
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X", b"")
