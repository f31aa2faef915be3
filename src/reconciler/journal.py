"""The journal: applies and their changes in SQLite under the state directory.

Holds outcomes, durations and error messages, never specs (so never userData).
"""

from __future__ import annotations

import datetime as _dt
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
"""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)
        os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def begin(self, command: str, source: str | None = None, revision: str | None = None) -> int:
        with closing(self._connect()) as db, db:
            cur = db.execute(
                "INSERT INTO applies (command, source, revision, started_at) VALUES (?, ?, ?, ?)",
                (command, source, revision, now_iso()),
            )
            return int(cur.lastrowid or 0)

    def record_change(self, apply_id: int, kind: str, tenant: str, name: str, action: str,
                      outcome: str, error: str | None, duration_s: float) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (apply_id, kind, tenant, name, action, outcome, error, duration_s, now_iso()),
            )

    def finish(self, apply_id: int, outcome: str, duration_s: float, counts: dict[str, int]) -> None:
        cols = ("created", "updated", "replaced", "deleted", "orphaned", "failed", "skipped")
        with closing(self._connect()) as db, db:
            db.execute(
                f"UPDATE applies SET finished_at=?, outcome=?, duration_s=?, "
                f"{', '.join(f'{c}=?' for c in cols)} WHERE id=?",
                (now_iso(), outcome, duration_s, *(counts.get(c, 0) for c in cols), apply_id),
            )

    def applies(self, limit: int = 10) -> list[dict[str, Any]]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM applies ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def last_source(self) -> str | None:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT source FROM applies WHERE source IS NOT NULL AND command = 'apply' "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
        return row["source"] if row else None

    def last_changes(self) -> dict[tuple[str, str, str], LastChange]:
        """The latest recorded change of every resource."""
        with closing(self._connect()) as db:
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
