"""The state store: upgrade phases, copy runs, their steps and chunks, schema errors, capture on/off (SQLite, WAL)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pgleap.errors import PgleapError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS upgrade_phase (
    database TEXT PRIMARY KEY,
    phase TEXT NOT NULL,               -- upgrade/phases.py Phase
    since REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS upgrade_route (
    database TEXT PRIMARY KEY,
    routed_to TEXT NOT NULL,           -- 'source' or 'target': where clients' transactions go
    snapshot TEXT NOT NULL,            -- txid_current_snapshot() of that server at the switch: its log starts there
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS upgrade_transition (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    database TEXT NOT NULL,
    from_phase TEXT,                   -- NULL for the first phase
    to_phase TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS capture_state (
    database TEXT PRIMARY KEY,
    capturing INTEGER NOT NULL,        -- 1 from START CAPTURE until STOP CAPTURE: a restart resumes it
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS copy_run (
    database TEXT PRIMARY KEY,
    run_id INTEGER NOT NULL,
    mode TEXT NOT NULL,                -- 'replica' or 'primary'
    snapshot TEXT,                     -- S = txid_current_snapshot() text form
    snapshot_lsn TEXT,                 -- replay position of the paused replica
    replica_start TEXT,                -- pg_postmaster_start_time() of the replica, to detect restarts
    status TEXT NOT NULL,              -- 'running', 'done', 'failed'
    started_at REAL NOT NULL,
    finished_at REAL,
    restart_reason TEXT,
    target_oid INTEGER                 -- pg_database.oid of the target database this run created (or found)
);
CREATE TABLE IF NOT EXISTS copy_step (
    database TEXT NOT NULL,
    step TEXT NOT NULL,
    status TEXT NOT NULL,              -- 'started', 'done'
    started_at REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (database, step)
);
CREATE TABLE IF NOT EXISTS copy_chunk (
    database TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    schema_name TEXT NOT NULL,
    table_name TEXT NOT NULL,
    kind TEXT NOT NULL,                -- 'table', 'key', 'ctid'
    lower TEXT,
    upper TEXT,
    est_rows REAL NOT NULL,
    est_bytes REAL NOT NULL,
    status TEXT NOT NULL,              -- 'pending', 'inflight', 'done'
    target_txid INTEGER,               -- target transaction of an inflight chunk (checked with txid_status)
    rows INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    snapshot TEXT,                     -- snapshot the rows were read at, when not the run's S
    flags TEXT NOT NULL DEFAULT '',    -- comma list: no_pk, unlogged, text_copy
    finished_at REAL,
    PRIMARY KEY (database, chunk_id)
);
CREATE TABLE IF NOT EXISTS schema_error (
    database TEXT NOT NULL,
    section TEXT NOT NULL,
    object TEXT NOT NULL,
    error TEXT NOT NULL,
    definition TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class StoreError(PgleapError):
    """The state store file cannot be opened or written."""


@dataclass(frozen=True)
class CopyRun:
    """The copy of one database: its snapshot S and where it came from."""

    database: str
    run_id: int
    mode: str
    snapshot: str | None
    snapshot_lsn: str | None
    replica_start: str | None
    status: str
    started_at: float
    finished_at: float | None
    restart_reason: str | None
    target_oid: int | None = None  # the target database's oid: replay refuses a database created again since


@dataclass(frozen=True)
class ChunkRecord:
    """One unit of data copy: a whole table, a key range or a ctid range."""

    chunk_id: str
    schema_name: str
    table_name: str
    kind: str
    lower: str | None
    upper: str | None
    est_rows: float
    est_bytes: float
    status: str = "pending"
    target_txid: int | None = None
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    snapshot: str | None = None
    flags: str = ""
    finished_at: float | None = None

    @property
    def flag_set(self) -> set[str]:
        """The flags as a set."""
        return {f for f in self.flags.split(",") if f}


@dataclass(frozen=True)
class SchemaErrorRecord:
    """An object the target rejected: the error and the object's definition."""

    section: str
    object: str
    error: str
    definition: str


@dataclass(frozen=True)
class PhaseRecord:
    """Where one database's upgrade stands, since when, and why it got there."""

    database: str
    phase: str
    since: float
    reason: str


@dataclass(frozen=True)
class Transition:
    """One logged change of phase."""

    database: str
    from_phase: str | None
    to_phase: str
    at: float
    reason: str


_CHUNK_COLUMNS = (
    "chunk_id, schema_name, table_name, kind, lower, upper, est_rows, est_bytes, status, "
    "target_txid, rows, bytes, seconds, snapshot, flags, finished_at"
)


class StateStore:
    """Durable copy state; every write is committed (and fsynced per `synchronous`) before it returns."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: the copy engine writes from its event loop thread while
            # a display or admin thread reads; the lock below serialises access.
            self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open the state store {self.path}: {exc}; check the directory exists and is writable"
            ) from exc
        self._lock = threading.RLock()

    def _add_missing_columns(self) -> None:
        # A store written by an older pgleap lacks the columns added since; CREATE TABLE IF NOT EXISTS keeps it.
        columns = {str(r[1]) for r in self._db.execute("PRAGMA table_info(copy_run)")}
        if "target_oid" not in columns:
            try:
                self._db.execute("ALTER TABLE copy_run ADD COLUMN target_oid INTEGER")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it first
                    raise

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(f"state store {self.path}: {exc}") from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"state store {self.path}: {exc}") from exc

    # -- upgrade phases -----------------------------------------------------------------------

    def phase(self, database: str) -> PhaseRecord | None:
        """The upgrade phase of `database` (None before START UPGRADE)."""
        rows = self._query("SELECT database, phase, since, reason FROM upgrade_phase WHERE database = ?", (database,))
        return PhaseRecord(str(rows[0][0]), str(rows[0][1]), float(rows[0][2]), str(rows[0][3])) if rows else None  # type: ignore[arg-type]

    def set_phase(self, database: str, phase: str, reason: str) -> None:
        """Move `database` to `phase`, logging the transition with its reason, in one transaction."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT phase FROM upgrade_phase WHERE database = ?", (database,)).fetchone()
            db.execute(
                "INSERT INTO upgrade_transition (database, from_phase, to_phase, at, reason) VALUES (?, ?, ?, ?, ?)",
                (database, row[0] if row else None, phase, now, reason),
            )
            db.execute(
                "INSERT INTO upgrade_phase (database, phase, since, reason) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (database) DO UPDATE SET phase = excluded.phase, since = excluded.since, "
                "reason = excluded.reason",
                (database, phase, now, reason),
            )

    def set_route(self, database: str, routed_to: str, snapshot: str) -> None:
        """Record where `database`'s clients are routed since a switch, and the new server's snapshot then."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO upgrade_route (database, routed_to, snapshot, changed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (database) DO UPDATE SET routed_to = excluded.routed_to, snapshot = excluded.snapshot, "
                "changed_at = excluded.changed_at",
                (database, routed_to, snapshot, time.time()),
            )

    def route(self, database: str) -> tuple[str, str] | None:
        """(routed_to, snapshot at the switch) of `database`, or None if it was never switched."""
        rows = self._query("SELECT routed_to, snapshot FROM upgrade_route WHERE database = ?", (database,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def transitions(self, database: str) -> list[Transition]:
        """Every phase change of `database`, oldest first."""
        rows = self._query(
            "SELECT database, from_phase, to_phase, at, reason FROM upgrade_transition WHERE database = ? ORDER BY id",
            (database,),
        )
        return [Transition(*r) for r in rows]  # type: ignore[arg-type]

    # -- capture ----------------------------------------------------------------------------

    def set_capturing(self, database: str, capturing: bool) -> None:
        """Record that `database`'s writes are (or no longer are) captured, so a restart resumes capture."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO capture_state (database, capturing, changed_at) VALUES (?, ?, ?) "
                "ON CONFLICT (database) DO UPDATE SET capturing = excluded.capturing, changed_at = excluded.changed_at",
                (database, int(capturing), time.time()),
            )

    def capturing(self) -> list[str]:
        """The databases whose capture was on when pgleap last stopped."""
        return [str(r[0]) for r in self._query("SELECT database FROM capture_state WHERE capturing = 1 ORDER BY 1")]

    # -- runs --------------------------------------------------------------------------------

    def run(self, database: str) -> CopyRun | None:
        """The current copy run of `database`, if any."""
        rows = self._query(
            "SELECT database, run_id, mode, snapshot, snapshot_lsn, replica_start, status, "
            "started_at, finished_at, restart_reason, target_oid FROM copy_run WHERE database = ?",
            (database,),
        )
        return CopyRun(*rows[0]) if rows else None  # type: ignore[arg-type]

    def start_run(
        self, database: str, mode: str, restart_reason: str | None = None, *, target_oid: int | None = None
    ) -> CopyRun:
        """Forget any previous run of `database` (steps, chunks, errors) and start one into the target `target_oid`."""
        previous = self.run(database)
        run_id = previous.run_id + 1 if previous else 1
        with self._tx() as db:
            for table in ("copy_step", "copy_chunk", "schema_error", "copy_run"):
                db.execute(f"DELETE FROM {table} WHERE database = ?", (database,))
            db.execute(
                "INSERT INTO copy_run (database, run_id, mode, status, started_at, restart_reason, target_oid) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (database, run_id, mode, time.time(), restart_reason, target_oid),
            )
        run = self.run(database)
        assert run is not None
        return run

    def set_snapshot(self, database: str, snapshot: str, lsn: str | None, replica_start: str | None) -> None:
        """Record S (and, for a replica, the paused replay position and the replica's start time)."""
        with self._tx() as db:
            db.execute(
                "UPDATE copy_run SET snapshot = ?, snapshot_lsn = ?, replica_start = ? WHERE database = ?",
                (snapshot, lsn, replica_start, database),
            )

    def finish_run(self, database: str, status: str = "done") -> None:
        """Mark the run done (or failed)."""
        with self._tx() as db:
            db.execute(
                "UPDATE copy_run SET status = ?, finished_at = ? WHERE database = ?", (status, time.time(), database)
            )

    # -- steps -------------------------------------------------------------------------------

    def step_status(self, database: str, step: str) -> str | None:
        """'started', 'done' or None."""
        rows = self._query("SELECT status FROM copy_step WHERE database = ? AND step = ?", (database, step))
        return str(rows[0][0]) if rows else None

    def mark_step(self, database: str, step: str, status: str) -> None:
        """Record that a step started or is done."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO copy_step (database, step, status, started_at, finished_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (database, step) DO UPDATE SET status = excluded.status, "
                "finished_at = excluded.finished_at",
                (database, step, status, now, now if status == "done" else None),
            )

    # -- chunks ------------------------------------------------------------------------------

    def add_chunks(self, database: str, chunks: list[ChunkRecord]) -> None:
        """Register the planned chunks (all at once, so a plan is either complete or absent)."""
        with self._tx() as db:
            db.executemany(
                f"INSERT INTO copy_chunk (database, {_CHUNK_COLUMNS}) VALUES ({', '.join('?' * 17)})",
                [
                    (
                        database,
                        c.chunk_id,
                        c.schema_name,
                        c.table_name,
                        c.kind,
                        c.lower,
                        c.upper,
                        c.est_rows,
                        c.est_bytes,
                        c.status,
                        c.target_txid,
                        c.rows,
                        c.bytes,
                        c.seconds,
                        c.snapshot,
                        c.flags,
                        c.finished_at,
                    )
                    for c in chunks
                ],
            )

    def chunks(self, database: str) -> list[ChunkRecord]:
        """Every chunk of the current run, in plan order."""
        rows = self._query(f"SELECT {_CHUNK_COLUMNS} FROM copy_chunk WHERE database = ? ORDER BY rowid", (database,))
        return [ChunkRecord(*row) for row in rows]  # type: ignore[arg-type]

    def mark_chunk_inflight(self, database: str, chunk_id: str, target_txid: int, snapshot: str | None = None) -> None:
        """Record the target transaction about to copy a chunk, before it commits."""
        with self._tx() as db:
            db.execute(
                "UPDATE copy_chunk SET status = 'inflight', target_txid = ?, snapshot = coalesce(?, snapshot) "
                "WHERE database = ? AND chunk_id = ?",
                (target_txid, snapshot, database, chunk_id),
            )

    def mark_chunk_inflight_counts(self, database: str, chunk_id: str, rows: int, nbytes: int, seconds: float) -> None:
        """Record what an inflight chunk copied, just before its target transaction commits."""
        with self._tx() as db:
            db.execute(
                "UPDATE copy_chunk SET rows = ?, bytes = ?, seconds = ? WHERE database = ? AND chunk_id = ?",
                (rows, nbytes, seconds, database, chunk_id),
            )

    def mark_chunk_done(self, database: str, chunk_id: str, rows: int, nbytes: int, seconds: float) -> None:
        """Record a chunk whose target transaction committed."""
        with self._tx() as db:
            db.execute(
                "UPDATE copy_chunk SET status = 'done', rows = ?, bytes = ?, seconds = ?, finished_at = ? "
                "WHERE database = ? AND chunk_id = ?",
                (rows, nbytes, seconds, time.time(), database, chunk_id),
            )

    def mark_chunk_pending(self, database: str, chunk_id: str) -> None:
        """Return a chunk whose target transaction rolled back to the queue."""
        with self._tx() as db:
            db.execute(
                "UPDATE copy_chunk SET status = 'pending', target_txid = NULL, rows = 0, bytes = 0, "
                "seconds = 0 WHERE database = ? "
                "AND chunk_id = ?",
                (database, chunk_id),
            )

    # -- schema errors -----------------------------------------------------------------------

    def add_schema_error(self, database: str, record: SchemaErrorRecord) -> None:
        """Keep an object the target rejected, for the report."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO schema_error (database, section, object, error, definition, at) VALUES (?, ?, ?, ?, ?, ?)",
                (database, record.section, record.object, record.error, record.definition, time.time()),
            )

    def schema_errors(self, database: str) -> list[SchemaErrorRecord]:
        """Objects the target rejected in the current run."""
        rows = self._query(
            "SELECT section, object, error, definition FROM schema_error WHERE database = ? ORDER BY rowid", (database,)
        )
        return [SchemaErrorRecord(*row) for row in rows]  # type: ignore[arg-type]
