"""The apply journal: apply errors, divergences and tables needing re-sync, in a small SQLite file.

It sits next to the change log (or in memory for tests) so that status can show it from any process
without a connection to the target. Rows are keyed by log position, so recording the same event again
after a crash and retry replaces the row instead of doubling it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from pgleap.upgrade.replay.errors import ApplyError, Divergence, ErrorKind

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apply_error (
    database TEXT NOT NULL, position INTEGER NOT NULL, txid INTEGER, statement_index INTEGER NOT NULL,
    statement TEXT NOT NULL, sqlstate TEXT NOT NULL, message TEXT NOT NULL, kind TEXT NOT NULL,
    action TEXT NOT NULL, resync_tables TEXT NOT NULL, recorded_at REAL NOT NULL,
    PRIMARY KEY (database, position)
);
CREATE TABLE IF NOT EXISTS divergence (
    database TEXT NOT NULL, position INTEGER NOT NULL, txid INTEGER, statement_index INTEGER NOT NULL,
    statement TEXT NOT NULL, source_tag TEXT NOT NULL, target_tag TEXT NOT NULL, recorded_at REAL NOT NULL,
    PRIMARY KEY (database, position, statement_index)
);
CREATE TABLE IF NOT EXISTS resync_table (
    database TEXT NOT NULL, table_name TEXT NOT NULL, position INTEGER NOT NULL, reason TEXT NOT NULL,
    required INTEGER NOT NULL DEFAULT 0, required_position INTEGER,
    PRIMARY KEY (database, table_name)
);
"""
# The flag of a transaction with a write that names no table (`SELECT f()`, CALL, DO): only every table
# verified clean clears it.
EVERY_TABLE = "*"


def flag_label(name: str) -> str:
    """A re-sync flag's table as a DBA reads it."""
    return "every table (a transaction's writes named none)" if name == EVERY_TABLE else name


# `required`: the target is known to lack or repeat a transaction there (one skipped, one without a txid
# applied over the copy, a statement across tables copied at different snapshots), not only that it may
# compute other values: cutover waits for the re-sync of such a table. `required_position`: the latest
# position that flagged it so; a check past it clears that, though flags that are not required came since.


class ApplyJournal:
    """Durable records of what replay could not apply as captured."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(resync_table)")}
        self._db.execute("BEGIN")  # all or nothing: a crash in between must not leave `required` without a position
        if "required" not in columns:  # a journal written before the column
            self._db.execute("ALTER TABLE resync_table ADD COLUMN required INTEGER NOT NULL DEFAULT 0")
        if "required_position" not in columns:  # ... or before this one: required as of its position
            self._db.execute("ALTER TABLE resync_table ADD COLUMN required_position INTEGER")
            self._db.execute("UPDATE resync_table SET required_position = position WHERE required <> 0")
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the file."""
        self._db.close()

    def record_error(self, error: ApplyError) -> None:
        """Record (or replace, after a retry) the error of one log position."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO apply_error VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    error.database,
                    error.position,
                    error.txid,
                    error.statement_index,
                    error.statement,
                    error.sqlstate,
                    error.message,
                    error.kind.value,
                    error.action,
                    json.dumps(list(error.resync_tables)),
                    error.recorded_at,
                ),
            )

    def record_divergences(self, divergences: list[Divergence]) -> None:
        """Record divergences found in one committed batch."""
        if not divergences:
            return
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO divergence VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        d.database,
                        d.position,
                        d.txid,
                        d.statement_index,
                        d.statement,
                        d.source_tag,
                        d.target_tag,
                        d.recorded_at,
                    )
                    for d in divergences
                ],
            )

    def mark_resync(
        self, database: str, tables: tuple[str, ...], position: int, reason: str, *, required: bool = False
    ) -> None:
        """Flag tables for re-sync: the first reason is kept, the latest position that flagged them, and whether
        any flag was `required` (see the schema)."""
        self.mark_resync_all(database, {t: (position, reason, required) for t in tables})

    def mark_resync_all(self, database: str, flags: dict[str, tuple[int, str, bool]]) -> None:
        """Flag each table with its (position, reason, required), as mark_resync does, in one durable write."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO resync_table VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?5 THEN ?3 END) "
                    "ON CONFLICT (database, table_name) DO UPDATE SET position = max(position, excluded.position), "
                    "required = max(required, excluded.required), "
                    "required_position = nullif(max(coalesce(required_position, 0), "
                    "coalesce(excluded.required_position, 0)), 0)",
                    [(database, table, *flag[:2], int(flag[2])) for table, flag in flags.items()],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def errors(self, database: str) -> list[ApplyError]:
        """Every recorded apply error of `database`, in log order."""
        rows = self._db.execute(
            "SELECT * FROM apply_error WHERE database = ? ORDER BY position", (database,)
        ).fetchall()
        return [
            ApplyError(
                database=r[0],
                position=r[1],
                txid=r[2],
                statement_index=r[3],
                statement=r[4],
                sqlstate=r[5],
                message=r[6],
                kind=ErrorKind(r[7]),
                action=r[8],
                resync_tables=tuple(json.loads(r[9])),
                recorded_at=r[10],
            )
            for r in rows
        ]

    def divergences(self, database: str) -> list[Divergence]:
        """Every recorded divergence of `database`, in log order."""
        rows = self._db.execute(
            "SELECT * FROM divergence WHERE database = ? ORDER BY position, statement_index", (database,)
        ).fetchall()
        return [Divergence(*r) for r in rows]

    def clear_resync(self, database: str, table: str, through: int | None = None) -> bool:
        """The table was re-synced and verified equal: no longer flagged, unless flagged after `through` since
        (then no longer required, unless flagged so after `through`); whether the flag is gone."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                deleted = self._db.execute(
                    "DELETE FROM resync_table WHERE database = ?1 AND table_name = ?2 "
                    "AND (?3 IS NULL OR position <= ?3)",
                    (database, table, through),
                ).rowcount
                self._db.execute(
                    "UPDATE resync_table SET required = 0, required_position = NULL "
                    "WHERE database = ? AND table_name = ? AND required_position <= ?",
                    (database, table, through),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return deleted > 0

    def required_resyncs(self, database: str) -> list[str]:
        """Tables of `database` whose re-sync cutover waits for (see the schema), by name."""
        rows = self._db.execute(
            "SELECT table_name FROM resync_table WHERE database = ? AND required <> 0 ORDER BY table_name",
            (database,),
        ).fetchall()
        return [str(name) for (name,) in rows]

    def resync_tables(self, database: str) -> list[str]:
        """Tables of `database` flagged for re-sync, by name."""
        return list(self.resync_flags(database))

    def resync_flags(self, database: str) -> dict[str, int]:
        """Tables of `database` flagged for re-sync, with the latest position that flagged each."""
        rows = self._db.execute(
            "SELECT table_name, position FROM resync_table WHERE database = ? ORDER BY table_name", (database,)
        ).fetchall()
        return {str(name): int(position) for name, position in rows}
