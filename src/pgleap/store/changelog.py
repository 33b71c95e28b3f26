"""The change log: every captured write transaction, durable before its COMMIT reaches the source.

Life of a record (docs/design-notes.md, "Durability across a crash between COMMIT and the log"):

1. `prepare(tx)` writes it as `pending` and returns only once that is durable (`prepare_then(tx, done)` calls
   `done` back instead); only then does the proxy forward the COMMIT.
2. `settle(log_id, committed)` marks it `committed` or `aborted` from the source's answer. Settling may be
   batched and its durability may lag: after a crash the record is still `pending`, and recovery settles it
   again from the source (`pending()`, then `resolve()` with `txid_status(txid)` on 10+, or `unresolved`
   on 9.x, where the outcome cannot be known; those are kept and reported, never dropped).
3. Committed records get a `position` per database, gap-free, in **prepare order** (the order in which their
   COMMITs were forwarded), not in the order the answers came back: a transaction that waited for a row lock
   held by another is necessarily prepared after the other committed, whereas its answer could be read first
   when a slow client delays reading the other one's. So a committed record becomes readable only once every
   record of its database prepared before it is settled; a record left `pending` holds back the ones after
   it until it is settled or resolved.

All SQLite writes happen in one writer thread with one connection, fed by a queue, so the event loop never
waits on the disk; callers await futures the writer completes, or (`prepare_then`, the commit path) are
called back in the loop straight from the writer. Reads use a second connection (WAL lets it read while the
writer writes).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any, Literal, cast

from pgleap.errors import PgleapError
from pgleap.store.checkpoint import BACKSTOP_PAGES, WalCheckpointer
from pgleap.store.checkpoint import INTERVAL as CHECKPOINT_INTERVAL
from pgleap.store.records import (
    CapturedTransaction,
    LoggedTransaction,
    LogState,
    decode_transaction,
    encode_transaction,
)

log = logging.getLogger(__name__)

Durability = Literal["commit", "batch"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS change_log (
    log_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- prepare order; AUTOINCREMENT: never reused after truncation
    database TEXT NOT NULL,
    txid INTEGER,                              -- source txid, for txid_status() and the snapshot S test
    state TEXT NOT NULL,                       -- 'pending', 'committed', 'aborted', 'unresolved'
    position INTEGER,                          -- commit order within database, set once committed
    size INTEGER NOT NULL,                     -- bytes of record, for lag in bytes
    prepared_at REAL NOT NULL,
    settled_at REAL,
    record BLOB NOT NULL                       -- records.encode_transaction()
);
CREATE UNIQUE INDEX IF NOT EXISTS change_log_position ON change_log (database, position)
    WHERE position IS NOT NULL;
CREATE INDEX IF NOT EXISTS change_log_order ON change_log (database, log_id);
CREATE INDEX IF NOT EXISTS change_log_open ON change_log (state) WHERE state IN ('pending', 'unresolved');
CREATE TABLE IF NOT EXISTS log_head (
    database TEXT PRIMARY KEY,
    last_position INTEGER NOT NULL,            -- highest position given out (kept across truncation)
    frontier INTEGER NOT NULL,                 -- every record of database with log_id <= frontier is settled
    trimmed_through INTEGER NOT NULL DEFAULT 0,  -- highest position deleted by truncate_before (0: none)
    trimmed_txid INTEGER,                      -- highest source txid among the committed records deleted
    trimmed_unplaced INTEGER NOT NULL DEFAULT 0  -- committed records without a txid among them
);
"""

# Columns added to a schema-version-1 log after it shipped (an older pgleap ignores them).
_ADDED_COLUMNS = (
    ("log_head", "trimmed_through", "INTEGER NOT NULL DEFAULT 0"),
    ("log_head", "trimmed_txid", "INTEGER"),
    ("log_head", "trimmed_unplaced", "INTEGER NOT NULL DEFAULT 0"),
)

# Ops are grouped into one SQLite transaction up to this many, so one huge burst cannot hold a single
# transaction (and every waiter in it) for long.
_MAX_GROUP = 1024
# After a settle-only group, how long the writer waits for a group that fsyncs anyway before it fsyncs the WAL
# itself: under load the next prepare makes the settles durable for free.
_SETTLE_SYNC_DELAY = 0.01

# SQLite primary result codes (sqlite3.h); extended codes carry them in the low byte.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR = 5, 6, 8, 10
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 11, 13, 14, 26

_LOW_SPACE = 4 * 1024 * 1024  # below this much free space, SQLITE_FULL is the disk, not max_bytes

_CONSEQUENCE = (
    "Clients keep working against the source, but transactions are missing from the change log "
    "from now on, so this upgrade must re-copy once the log can be written again."
)


# -- errors -----------------------------------------------------------------------------------------


class ChangeLogError(PgleapError):
    """The change log cannot be opened, read or written; the message says why and what to do."""


class ChangeLogFullError(ChangeLogError):
    """The change log cannot grow: its filesystem is full or it reached its size limit."""


class ChangeLogIOError(ChangeLogError):
    """The operating system reported an I/O error reading or writing the change log."""


class ChangeLogReadOnlyError(ChangeLogError):
    """The change log (or its directory, or its filesystem) is read-only."""


class ChangeLogCorruptError(ChangeLogError):
    """The change log file is damaged, not a change log, or from a newer pgleap."""


class ChangeLogLockedError(ChangeLogError):
    """Another process holds the change log."""


class ChangeLogClosedError(ChangeLogError):
    """The change log was used after close()."""


class ChangeLogStateError(ChangeLogError):
    """A settle or resolve names an unknown record or asks for a transition that is not allowed."""


# What `prepare_then` calls back with: the log id, or the error that kept the record out of the log.
PrepareDone = Callable[[int | None, ChangeLogError | None], None]


@dataclass(frozen=True)
class ChangeLogStats:
    """A snapshot of the log for status and metrics: records per state, size, writer activity, health."""

    pending: int
    committed: int
    aborted: int
    unresolved: int
    bytes: int  # encoded size of every record still in the log
    queued: int  # ops waiting for the writer thread
    sqlite_commits: int  # SQLite transactions committed since open (one fsync each)
    errors: int  # storage errors since open
    healthy: bool
    last_error: str | None

    def as_dict(self) -> dict[str, int | bool | str | None]:
        """The fields by name, for status output."""
        return dict(asdict(self))


@dataclass(frozen=True)
class Trimmed:
    """What `truncate_before` deleted of one database's committed records, so replay can place the gap."""

    through: int = 0  # the highest position deleted (0: nothing was)
    max_txid: int | None = None  # the highest source txid among them
    unplaced: int = 0  # how many had no txid (cannot be placed against a snapshot)


# -- the interface ----------------------------------------------------------------------------------


class ChangeLog(abc.ABC):
    """The durable log of captured transactions; SQLite by default, other backends later."""

    @abc.abstractmethod
    async def prepare(self, tx: CapturedTransaction) -> int:
        """Durably record `tx` as pending (before its COMMIT is forwarded); return its log id."""

    @abc.abstractmethod
    def prepare_then(self, tx: CapturedTransaction, done: PrepareDone) -> None:
        """`prepare` for a held COMMIT: queued at once, then `done(log_id, None)` or `done(None, error)`.

        `done` runs in the caller's event loop as soon as the record is durable, with no task or future in
        between: each of those would cost every held COMMIT another turn of the loop.
        """

    @abc.abstractmethod
    async def settle(self, log_id: int, committed: bool, *, wait: bool = False) -> None:
        """Mark a pending record committed or aborted; `wait` waits until that is durable."""

    @abc.abstractmethod
    def settle_nowait(self, log_id: int, committed: bool) -> None:
        """`settle` without waiting, queued at once (in order with every prepare and settle before it)."""

    @abc.abstractmethod
    async def resolve(self, log_id: int, state: LogState) -> None:
        """Settle a pending (or unresolved) record after a crash; durable when it returns."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until everything asked of the log before this call is durable."""

    @abc.abstractmethod
    async def truncate_before(
        self, database: str, position: int, limit: int | None = None, older_than: float | None = None
    ) -> int:
        """Delete applied records of `database` below `position` (and aborted ones before them), `limit` at most,
        prepared before `older_than` only."""

    @abc.abstractmethod
    def trimmed(self, database: str) -> Trimmed:
        """What truncate_before has deleted of `database`'s committed records, over the log's life."""

    @abc.abstractmethod
    def pending(self) -> list[tuple[int, CapturedTransaction]]:
        """Records still pending, in prepare order: what crash recovery must settle."""

    @abc.abstractmethod
    def left_pending(self) -> list[tuple[int, CapturedTransaction]]:
        """Records pending since before this log was opened (a crash left them) or whose settle failed.

        Other pending records prepared since belong to sessions of this process, whose COMMIT answers settle them.
        """

    @abc.abstractmethod
    def unresolved(self) -> list[LoggedTransaction]:
        """Records whose outcome could not be determined, to report (I1)."""

    @abc.abstractmethod
    def read_committed(self, database: str, after_position: int, limit: int) -> list[LoggedTransaction]:
        """Committed records of `database` after `after_position`, in position order."""

    @abc.abstractmethod
    def last_position(self, database: str) -> int:
        """The highest position given to a committed record of `database` (0 if none)."""

    @abc.abstractmethod
    def backlog(self, database: str, after_position: int) -> tuple[int, int, float | None]:
        """Records of `database` replay has still to apply: (count, bytes, when the oldest was logged).

        Those positioned after `after_position`, and those not positioned yet: pending (their COMMIT in
        flight) or committed behind a pending one.
        """

    @abc.abstractmethod
    def last_log_id(self) -> int:
        """The log id of the most recent prepare (0 if none): every COMMIT forwarded so far is at or below it."""

    @abc.abstractmethod
    def settled_through(self) -> int:
        """The highest log id at and below which every record has settled or has its settle queued."""

    @abc.abstractmethod
    def position_through(self, database: str, log_id: int) -> int | None:
        """The last position of `database` given to a record prepared at or before `log_id`.

        None while a record of `database` prepared at or before `log_id` is still pending (its position,
        if it commits, is not known yet).
        """

    @abc.abstractmethod
    def stats(self) -> ChangeLogStats:
        """Counts per state, sizes, commits and health, for status and metrics."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False from the first failed write or read on: the log is missing transactions."""

    @property
    @abc.abstractmethod
    def last_error(self) -> str | None:
        """The message of the most recent storage error, if any."""

    @abc.abstractmethod
    def close(self) -> None:
        """Write what is queued, then close."""


# -- the writer's queue -----------------------------------------------------------------------------


class _Kind(Enum):
    PREPARE = "prepare"
    SETTLE = "settle"
    RESOLVE = "resolve"
    TRUNCATE = "truncate"
    BARRIER = "barrier"


@dataclass
class _Callback:
    """The writer's answer to a `prepare_then`: `done` called in the loop, with the log id or the error."""

    loop: asyncio.AbstractEventLoop
    fn: PrepareDone

    def done(self, result: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is left to tell
            self.loop.call_soon_threadsafe(self.fn, cast("int", result), None)

    def fail(self, exc: ChangeLogError) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.fn, None, exc)


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    on_cancelled: Callable[[Any], None] | None = None  # called with the result nobody waits for any more

    def done(self, result: object) -> None:
        self._call(self._set_result, result)

    def fail(self, exc: BaseException) -> None:
        self._call(_set_exception, exc)

    def _call(self, fn: Any, value: object) -> None:
        # The loop may be gone (a caller that gave up and closed it); nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, self.future, value)

    def _set_result(self, future: asyncio.Future[Any], value: object) -> None:
        if future.cancelled() and self.on_cancelled is not None:
            self.on_cancelled(value)
        elif not future.done():
            future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


@dataclass
class _Op:
    kind: _Kind
    waiter: _Waiter | _Callback | None = None
    log_id: int = 0
    state: LogState | None = None
    tx: CapturedTransaction | None = None
    record: bytes = b""
    database: str = ""
    position: int = 0
    limit: int = -1  # TRUNCATE: at most this many committed records (-1: all)
    older_than: float = float("inf")  # TRUNCATE: only records prepared before this time.time()
    enqueued_at: float = field(default_factory=time.monotonic)


class _OpQueue:
    """FIFO of ops for the writer thread; hands them out in groups that become one SQLite transaction."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[_Op] = deque()
        self._closed = False

    def put(self, op: _Op) -> None:
        with self._cond:
            if self._closed:
                raise ChangeLogClosedError("the change log is closed; no more writes are accepted")
            self._items.append(op)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def __len__(self) -> int:
        return len(self._items)

    def wait_for_more(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for an op to arrive; whether one is queued (or the queue closed)."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return bool(self._items) or self._closed

    def take(self, window: float) -> list[_Op] | None:
        """The next group: everything queued, or None once closed and empty.

        window: how long after the first op arrived to keep collecting more (durability "batch"). With 0
        (durability "commit") nobody waits for company, but what queued while the last fsync ran shares
        the next one: one prepare per fsync would cap a busy source at one transaction per fsync.
        """
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            group: list[_Op] = []
            deadline = self._items[0].enqueued_at + window
            while True:
                while self._items and len(group) < _MAX_GROUP:
                    group.append(self._items.popleft())
                remaining = deadline - time.monotonic()
                if len(group) >= _MAX_GROUP or self._closed or remaining <= 0:
                    return group
                self._cond.wait(remaining)


# -- SQLite implementation --------------------------------------------------------------------------


@dataclass
class _Counts:
    """Records and bytes per state, kept in memory so stats() needs no table scan."""

    records: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in LogState})
    size: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in LogState})

    def move(self, old: str | None, new: str | None, size: int) -> None:
        for state, sign in ((old, -1), (new, 1)):
            if state is not None:
                self.records[state] += sign
                self.size[state] += sign * size

    def merge(self, other: _Counts) -> None:
        for state in self.records:
            self.records[state] += other.records[state]
            self.size[state] += other.size[state]


@dataclass
class _Effects:
    """What one group of ops changed, applied to memory only once its SQLite transaction committed."""

    counts: _Counts = field(default_factory=_Counts)
    touched: dict[str, list[int]] = field(default_factory=dict)  # database -> unresolved records now committed


class SQLiteChangeLog(ChangeLog):
    """The change log in a SQLite file (WAL mode, synchronous=FULL), written by one background thread."""

    def __init__(
        self,
        path: str | Path,
        durability: Durability = "commit",
        batch_interval: float = 0.005,
        *,
        max_bytes: int | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        if durability not in ("commit", "batch"):
            raise ValueError(f"durability must be 'commit' or 'batch', not {durability!r}")
        self.path = Path(path)
        self.durability: Durability = durability
        self.batch_interval = batch_interval
        self.max_bytes = max_bytes
        self.sqlite_commits = 0  # SQLite transactions committed by the writer (one fsync each)
        self.error_count = 0
        self._healthy = True
        self._last_error: str | None = None
        self._counts = _Counts()
        self._counts_lock = threading.Lock()
        self._queue = _OpQueue()
        self._read_lock = threading.Lock()
        # Settle-only groups are committed without an fsync (recovery can redo a settle), so the positions
        # they give are not durable yet: replay must not apply them before they are (a power loss would let
        # recovery hand the same position to another transaction). Per database, the last durable one.
        self._volatile: dict[str, int] = {}
        self._volatile_lock = threading.Lock()
        self._synchronous_full = True
        self._unsynced: list[tuple[_Op, object]] = []  # settles committed without an fsync, answered once synced
        # Log ids whose settle is queued and not written yet: their COMMIT has been answered, so a read
        # forwarded now sees them (settled_through), though the file still says pending.
        self._settling: set[int] = set()
        self._lock_file = self._take_lock()
        self._db = self._connect_or_unlock()
        try:
            self._init_schema()
            self._reader = self._connect()
            self._load_counts()
            # Pending now means pending at a crash: recovery's, not a live session's (see left_pending). Records
            # whose settle the disk refuses later join them: nothing else would settle those again.
            self._for_recovery = {int(log_id) for log_id, _ in self.pending()}
            self._checkpointer = WalCheckpointer(self._connect, self.path.name, checkpoint_interval)
        except ChangeLogError:
            with contextlib.suppress(AttributeError):
                self._reader.close()
            self._db.close()
            self._lock_file.close()
            raise
        self._writer = threading.Thread(target=self._write_loop, name=f"changelog-writer:{self.path.name}", daemon=True)
        self._writer.start()

    # -- opening ---------------------------------------------------------------------------------

    def _take_lock(self) -> IO[bytes]:
        # Two processes appending to one log would interleave positions; refuse clearly instead of
        # letting one of them wait on SQLite's busy timeout while clients wait on it.
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "ab")  # noqa: SIM115 - held open for the log's lifetime
        except OSError as exc:
            raise self._os_error(exc, "open") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise ChangeLogLockedError(
                f"the change log {self.path} is in use by another process (it holds {lock_path}); "
                f"stop the other pgleap, or give this one its own change log path"
            ) from exc
        return handle

    def _connect_or_unlock(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except ChangeLogError:
            self._lock_file.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            # check_same_thread=False: built here, then used by the writer thread (the writer connection)
            # or by whichever thread reads (the reader, under _read_lock).
            db = sqlite3.connect(str(self.path), timeout=5, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "open") from exc
        try:
            self._configure(db)
        except BaseException:
            db.close()
            raise
        return db

    def _configure(self, db: sqlite3.Connection) -> None:
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a committed transaction survives power loss
            # SQLite's own checkpoint runs inside a COMMIT and stalled every held one (checkpoint.py does it off
            # that path); kept only as a backstop, should that thread fail, so the WAL cannot grow without end.
            db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            if self.max_bytes is not None:
                page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
                db.execute(f"PRAGMA max_page_count={max(1, self.max_bytes // page_size)}")
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "open") from exc
        if str(mode).lower() != "wal":
            raise ChangeLogError(
                f"the change log {self.path} cannot use SQLite's WAL mode (got {mode!r}): its filesystem lacks "
                f"shared-memory support (network filesystems often do); put the change log on a local disk"
            )

    def _init_schema(self) -> None:
        try:
            # One script, one transaction: a crash while creating the schema leaves none of it.
            self._db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA}; INSERT INTO schema_version (version) "
                f"SELECT {SCHEMA_VERSION} WHERE NOT EXISTS (SELECT 1 FROM schema_version); "
                f"COMMIT;"
            )
            found = int(self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0])
        except sqlite3.Error as exc:
            self._rollback()
            raise self._storage_error(exc, "create the schema of") from exc
        if found > SCHEMA_VERSION:
            raise ChangeLogCorruptError(
                f"the change log {self.path} has schema version {found}, written by a newer pgleap (this one "
                f"reads up to {SCHEMA_VERSION}); run that pgleap version, or move the file aside and re-copy"
            )
        try:
            self._add_columns()
        except sqlite3.Error as exc:
            self._rollback()
            raise self._storage_error(exc, "update the schema of") from exc

    def _add_columns(self) -> None:
        missing = [
            (table, column, decl)
            for table, column, decl in _ADDED_COLUMNS
            if column not in {str(r[1]) for r in self._db.execute(f"PRAGMA table_info({table})")}
        ]
        if not missing:
            return
        self._db.execute("BEGIN IMMEDIATE")
        for table, column, decl in missing:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        # An older pgleap's retention kept no account of what it deleted: a log short of positions 1..last has
        # lost records nobody can place now, so replay must never pass over them (as if one had no txid).
        self._db.execute(
            "UPDATE log_head SET trimmed_unplaced = 1, trimmed_through = coalesce("
            "(SELECT min(position) - 1 FROM change_log c WHERE c.database = log_head.database), last_position) "
            "WHERE last_position > (SELECT count(*) FROM change_log c "
            "WHERE c.database = log_head.database AND c.position IS NOT NULL)"
        )
        self._db.execute("COMMIT")

    def _load_counts(self) -> None:
        rows = self._read("SELECT state, count(*), coalesce(sum(size), 0) FROM change_log GROUP BY state")
        for state, records, size in rows:
            self._counts.records[str(state)] = int(records)
            self._counts.size[str(state)] = int(size)

    # -- health ----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False from the first failed write or read on: the log is missing transactions."""
        return self._healthy

    @property
    def last_error(self) -> str | None:
        """The message of the most recent storage error, if any."""
        return self._last_error

    def _report(self, error: ChangeLogError) -> None:
        # Loud on purpose (I5): the proxy keeps clients on the source, so this log line, status and the
        # metrics are how anyone learns the upgrade needs a re-copy.
        self._healthy = False
        self._last_error = str(error)
        self.error_count += 1
        log.error("%s", error)

    # -- writes (through the writer thread) ------------------------------------------------------

    async def prepare(self, tx: CapturedTransaction) -> int:
        """Durably record `tx` as pending (before its COMMIT is forwarded); return its log id."""
        record = encode_transaction(tx)
        log_id: int = await self._submit(
            _Op(_Kind.PREPARE, tx=tx, record=record), wait=True, on_cancelled=self._abort_orphan
        )
        return log_id

    def prepare_then(self, tx: CapturedTransaction, done: PrepareDone) -> None:
        """`prepare` for a held COMMIT: queued at once, `done(log_id, None)` or `done(None, error)` once durable."""
        loop = asyncio.get_running_loop()
        try:
            op = _Op(_Kind.PREPARE, tx=tx, record=encode_transaction(tx))
            op.waiter = _Callback(loop, done)
            self._queue.put(op)
        except ChangeLogError as exc:
            loop.call_soon(done, None, exc)  # never from inside the caller's own call

    def _abort_orphan(self, log_id: int) -> None:
        # The caller was cancelled before it learned the log id, so it cannot have forwarded the COMMIT
        # (the proxy forwards only after prepare returns): abort the record rather than leave it pending,
        # holding back every later record of its database until the next restart's recovery.
        with contextlib.suppress(ChangeLogClosedError):
            self._queue.put(_Op(_Kind.SETTLE, log_id=log_id, state=LogState.ABORTED))

    async def settle(self, log_id: int, committed: bool, *, wait: bool = False) -> None:
        """Mark a pending record committed or aborted; `wait` waits until that is durable.

        Without `wait` this returns at once: the COMMIT answer can go to the client without an fsync,
        because a record whose settle was lost in a crash is still pending and recovery settles it again.
        """
        if not wait:
            self.settle_nowait(log_id, committed)
            return
        state = LogState.COMMITTED if committed else LogState.ABORTED
        self._settling.add(log_id)
        try:
            await self._submit(_Op(_Kind.SETTLE, log_id=log_id, state=state), wait=True)
        finally:
            self._settling.discard(log_id)  # written, failed or never queued: the file says which

    def settle_nowait(self, log_id: int, committed: bool) -> None:
        """`settle` without waiting, queued at once (in order with every prepare and settle before it)."""
        state = LogState.COMMITTED if committed else LogState.ABORTED
        self._settling.add(log_id)
        try:
            self._queue.put(_Op(_Kind.SETTLE, log_id=log_id, state=state))
        except ChangeLogError:
            self._settling.discard(log_id)  # never queued: still pending
            raise

    async def resolve(self, log_id: int, state: LogState) -> None:
        """Settle a pending (or unresolved) record after a crash; durable when it returns."""
        if state is LogState.PENDING:
            raise ChangeLogStateError(
                f"cannot resolve change-log record {log_id} to pending; resolve it to committed, aborted or unresolved"
            )
        await self._submit(_Op(_Kind.RESOLVE, log_id=log_id, state=state), wait=True)

    async def flush(self) -> None:
        """Wait until everything asked of the log before this call is durable."""
        await self._submit(_Op(_Kind.BARRIER), wait=True)

    async def truncate_before(
        self, database: str, position: int, limit: int | None = None, older_than: float | None = None
    ) -> int:
        """Delete applied records of `database` below `position` (and aborted ones before them), the oldest
        `limit` of them at most (one write group: a COMMIT held meanwhile waits only for that many), and
        only those prepared before `older_than` (a time.time())."""
        op = _Op(
            _Kind.TRUNCATE,
            database=database,
            position=position,
            limit=-1 if limit is None else limit,
            older_than=float("inf") if older_than is None else older_than,
        )
        deleted: int = await self._submit(op, wait=True)
        return deleted

    async def _submit(self, op: _Op, wait: bool, on_cancelled: Callable[[Any], None] | None = None) -> Any:
        if not wait:
            self._queue.put(op)
            return None
        loop = asyncio.get_running_loop()
        op.waiter = _Waiter(loop, loop.create_future(), on_cancelled)
        self._queue.put(op)
        # A caller cancelled here does not unqueue the op: it is still written (see _abort_orphan).
        return await op.waiter.future

    # -- the writer thread -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        window = self.batch_interval if self.durability == "batch" else 0.0
        while (group := self._queue.take(window)) is not None:
            try:
                try:
                    self._write_group(group)
                finally:
                    # Written or failed (then still pending, as the file says): no longer in between.
                    self._settling.difference_update(op.log_id for op in group if op.kind is _Kind.SETTLE)
                self._checkpointer.after_commit(self._db)
                if self._unsynced and not self._queue.wait_for_more(_SETTLE_SYNC_DELAY):
                    self._sync_wal()
            except Exception as exc:
                # A bug here must not leave callers awaiting forever with their COMMIT held: fail this
                # group loudly and keep serving the next ones.
                self._rollback()
                error = ChangeLogError(
                    f"internal error writing the change log {self.path}: {exc!r}; please report it. {_CONSEQUENCE}"
                )
                error.__cause__ = exc
                log.exception("change log writer failed")
                self._report(error)
                for op in group:
                    self._fail_op(op, error)
        if self._unsynced:
            self._sync_wal()  # closing: nothing answered may stay undurable

    def _write_group(self, group: list[_Op], *, settles_again: bool = True) -> None:
        fx = _Effects()
        durable = any(op.kind is not _Kind.SETTLE for op in group)
        try:
            if durable != self._synchronous_full:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._synchronous_full = durable
            changes = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            results = [self._apply(op, fx) for op in group]
            for database, late in fx.touched.items():
                self._advance(database, late)
            self._db.execute("COMMIT")
            wrote = self._db.total_changes != changes
        except sqlite3.Error as exc:
            self._rollback()
            error = self._storage_error(exc, "write")
            error.__cause__ = exc  # raised in the callers' tasks, far from here: keep SQLite's own error
            self._report(error)
            settles = [op for op in group if op.kind is _Kind.SETTLE]
            if settles_again and 0 < len(settles) < len(group):
                # One prepare the disk refused must not take other sessions' settles down with it: nobody
                # waits for those, and their records would stay pending, holding replay back until a restart.
                for op in group:
                    if op.kind is not _Kind.SETTLE:
                        self._fail_op(op, error)
                self._write_group(settles, settles_again=False)
                return
            for op in group:
                self._fail_op(op, error)
            return
        self.sqlite_commits += 1
        with self._counts_lock:
            self._counts.merge(fx.counts)
        if not durable or (not wrote and self._unsynced):
            # A COMMIT that changed nothing writes no WAL frame, so SQLite fsyncs nothing: a barrier (or a
            # resolve that found its record settled already) is answered with the settles before it, once
            # they are durable, never on the strength of a sync that did not happen.
            self._unsynced += zip(group, results, strict=True)
            if durable:
                self._sync_wal()
            return
        self._synced()  # this fsync made every earlier commit durable too (one WAL)
        for op, result in zip(group, results, strict=True):
            self._finish_op(op, result)

    def _synced(self) -> None:
        with self._volatile_lock:
            self._volatile.clear()
        unsynced, self._unsynced = self._unsynced, []
        for op, result in unsynced:
            self._finish_op(op, result)

    def _finish_op(self, op: _Op, result: object) -> None:
        if isinstance(result, ChangeLogStateError):
            self._fail_op(op, result)
        elif op.waiter is not None:
            op.waiter.done(result)

    def _fail_op(self, op: _Op, error: ChangeLogError) -> None:
        if op.kind is _Kind.SETTLE and not isinstance(error, ChangeLogStateError):
            self._for_recovery.add(op.log_id)  # still pending in the file: recovery's at the next START CAPTURE
        if op.waiter is not None:
            op.waiter.fail(error)
        elif isinstance(error, ChangeLogStateError):
            log.warning("%s", error)  # a settle nobody waits for; storage errors are already logged

    def _apply(self, op: _Op, fx: _Effects) -> object:
        try:
            if op.kind is _Kind.PREPARE:
                return self._insert(op, fx.counts)
            if op.kind in (_Kind.SETTLE, _Kind.RESOLVE):
                self._transition(op, fx)
                return None
            if op.kind is _Kind.TRUNCATE:
                return self._truncate(op.database, op.position, op.limit, op.older_than, fx.counts)
            return None
        except ChangeLogStateError as exc:
            return exc  # one bad settle must not undo the rest of the group

    def _insert(self, op: _Op, counts: _Counts) -> int:
        assert op.tx is not None
        cursor = self._db.execute(
            "INSERT INTO change_log (database, txid, state, size, prepared_at, record) VALUES (?, ?, ?, ?, ?, ?)",
            (op.tx.database, op.tx.txid, LogState.PENDING.value, len(op.record), time.time(), op.record),
        )
        counts.move(None, LogState.PENDING.value, len(op.record))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _transition(self, op: _Op, fx: _Effects) -> None:
        assert op.state is not None
        row = self._db.execute("SELECT database, state, size FROM change_log WHERE log_id = ?", (op.log_id,)).fetchone()
        if row is None:
            raise ChangeLogStateError(
                f"change-log record {op.log_id} does not exist (or was truncated); cannot mark it {op.state.value}"
            )
        database, old, size = str(row[0]), LogState(row[1]), int(row[2])
        if old is op.state:
            return  # settling twice (recovery after a settle that did land) is harmless
        allowed = {LogState.PENDING} if op.kind is _Kind.SETTLE else {LogState.PENDING, LogState.UNRESOLVED}
        if old not in allowed:
            raise ChangeLogStateError(
                f"change-log record {op.log_id} is already {old.value}; it cannot become {op.state.value}"
            )
        self._db.execute(
            "UPDATE change_log SET state = ?, settled_at = ? WHERE log_id = ?", (op.state.value, time.time(), op.log_id)
        )
        fx.counts.move(old.value, op.state.value, size)
        late = fx.touched.setdefault(database, [])
        if old is LogState.UNRESOLVED and op.state is LogState.COMMITTED:
            late.append(op.log_id)

    def _head(self, database: str) -> tuple[int, int]:
        row = self._db.execute(
            "SELECT last_position, frontier FROM log_head WHERE database = ?", (database,)
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def _advance(self, database: str, late: list[int]) -> None:
        """Give positions to committed records of `database` whose predecessors are all settled.

        Once per database per group, after all its settles: one scan from the frontier, however many settles.
        """
        last_position, frontier = self._head(database)
        if not self._synchronous_full:
            with self._volatile_lock:
                self._volatile.setdefault(database, last_position)
        assign: list[tuple[int, int]] = []
        for log_id in late:
            if log_id <= frontier:
                # An unresolved record found committed after the records behind it were positioned: it
                # can only go last. Replay reports it as out of order rather than dropping it.
                last_position += 1
                assign.append((last_position, log_id))
        rows = self._db.execute(
            "SELECT log_id, state, position FROM change_log WHERE database = ? AND log_id > ? ORDER BY log_id",
            (database, frontier),
        )
        for log_id, state, position in rows:
            if state == LogState.PENDING.value:
                break
            if state == LogState.COMMITTED.value and position is None:
                last_position += 1
                assign.append((last_position, int(log_id)))
            frontier = int(log_id)
        rows.close()
        self._db.executemany("UPDATE change_log SET position = ? WHERE log_id = ?", assign)
        self._db.execute(
            "INSERT INTO log_head (database, last_position, frontier) VALUES (?, ?, ?) "
            "ON CONFLICT (database) DO UPDATE SET last_position = excluded.last_position, "
            "frontier = excluded.frontier",
            (database, last_position, frontier),
        )

    def _truncate(self, database: str, position: int, limit: int, older_than: float, counts: _Counts) -> int:
        oldest = (
            "SELECT log_id FROM change_log WHERE database = :db AND position < :position AND prepared_at < :before "
            "ORDER BY position LIMIT :limit"
        )
        args: dict[str, object] = {"db": database, "position": position, "before": older_than, "limit": limit}
        row = self._db.execute(f"SELECT max(log_id) FROM ({oldest})", args).fetchone()
        if row is None or row[0] is None:
            return 0
        # Aborted records before the last truncated committed one are of no further use; unresolved and
        # pending ones are kept whatever their age (I1: reported, never silently dropped).
        where = f"log_id IN ({oldest}) OR (database = :db AND state = 'aborted' AND log_id < :cutoff)"
        args["cutoff"] = int(row[0])
        # Kept with the head, in the same transaction as the delete: a target copied again later starts at
        # position 0, and replay may pass over the deleted range only if its copy snapshot holds all of it.
        through, txid, unplaced = self._db.execute(
            f"SELECT max(position), max(txid), count(*) - count(txid) FROM change_log WHERE log_id IN ({oldest})", args
        ).fetchone()
        self._db.execute(
            "UPDATE log_head SET trimmed_through = max(trimmed_through, ?), "
            "trimmed_txid = max(coalesce(trimmed_txid, 0), ?), trimmed_unplaced = trimmed_unplaced + ? "
            "WHERE database = ?",
            (int(through or 0), int(txid or 0), int(unplaced), database),
        )
        for state, n, size in self._db.execute(
            f"SELECT state, count(*), coalesce(sum(size), 0) FROM change_log WHERE {where} GROUP BY state", args
        ):
            counts.records[str(state)] -= int(n)
            counts.size[str(state)] -= int(size)
        return self._db.execute(f"DELETE FROM change_log WHERE {where}", args).rowcount

    def _rollback(self) -> None:
        # After SQLITE_FULL or an I/O error SQLite may already have rolled back; a second failure here
        # adds nothing to the error being reported.
        with contextlib.suppress(sqlite3.Error):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    # -- reads (reader connection, any thread) ---------------------------------------------------

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            try:
                return list(self._reader.execute(sql, args).fetchall())
            except sqlite3.ProgrammingError as exc:
                raise ChangeLogClosedError(f"the change log {self.path} is closed") from exc
            except sqlite3.Error as exc:
                error = self._storage_error(exc, "read")
                self._report(error)
                raise error from exc

    def pending(self) -> list[tuple[int, CapturedTransaction]]:
        """Records still pending, in prepare order: what crash recovery must settle."""
        rows = self._read("SELECT log_id, record FROM change_log WHERE state = 'pending' ORDER BY log_id")
        return [(int(log_id), decode_transaction(record)) for log_id, record in rows]

    def left_pending(self) -> list[tuple[int, CapturedTransaction]]:
        """Records pending since before this log was opened (a crash left them) or whose settle failed."""
        if not self._for_recovery:
            return []  # the common case, without reading every record pending now
        return [(log_id, tx) for log_id, tx in self.pending() if log_id in self._for_recovery]

    def unresolved(self) -> list[LoggedTransaction]:
        """Records whose outcome could not be determined, to report (I1)."""
        rows = self._read(
            "SELECT log_id, position, state, record FROM change_log WHERE state = 'unresolved' ORDER BY log_id"
        )
        return [_logged(row) for row in rows]

    def read_committed(self, database: str, after_position: int, limit: int) -> list[LoggedTransaction]:
        """Committed records of `database` after `after_position`, in position order."""
        rows = self._read(
            "SELECT log_id, position, state, record FROM change_log WHERE database = ? "
            "AND position > ? ORDER BY position LIMIT ?",
            (database, after_position, limit),
        )
        # The bound is read after the rows: the writer sets it before the COMMIT that makes undurable positions
        # visible, so rows that show them find it here (read first, a commit in between would slip past it).
        with self._volatile_lock:
            durable = self._volatile.get(database)
        return [_logged(row) for row in rows if durable is None or row[1] <= durable]

    def _sync_wal(self) -> None:
        """fsync the WAL, making the settles committed without one durable (the log is idle meanwhile)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("change log %s: could not fsync its WAL (%s); settles wait for the next write", self.path, exc)
            return
        self._synced()

    def trimmed(self, database: str) -> Trimmed:
        """What truncate_before has deleted of `database`'s committed records, over the log's life."""
        rows = self._read(
            "SELECT trimmed_through, trimmed_txid, trimmed_unplaced FROM log_head WHERE database = ?", (database,)
        )
        if not rows:
            return Trimmed()
        through, txid, unplaced = rows[0]
        return Trimmed(int(through), int(txid) if txid else None, int(unplaced))

    def last_position(self, database: str) -> int:
        """The highest position given to a committed record of `database` (0 if none)."""
        rows = self._read("SELECT last_position FROM log_head WHERE database = ?", (database,))
        return int(rows[0][0]) if rows else 0

    def backlog(self, database: str, after_position: int) -> tuple[int, int, float | None]:
        """Records of `database` replay has still to apply: (count, bytes, when the oldest was logged)."""
        # A client has its COMMIT answer a moment before the writer settles the record; counting only
        # positioned records would show lag 0 in that moment, or for as long as a pending record holds
        # later commits unpositioned. Unpositioned records all lie past the database's frontier: a short
        # range of its own index (SQLite would rather scan the rowids past it, every database's).
        ((count, nbytes, oldest),) = self._read(
            "SELECT count(*), coalesce(sum(size), 0), min(prepared_at) FROM ("
            "SELECT size, prepared_at FROM change_log WHERE database = ?1 AND position > ?2 UNION ALL "
            "SELECT size, prepared_at FROM change_log INDEXED BY change_log_order WHERE database = ?1 "
            "AND log_id > coalesce((SELECT frontier FROM log_head WHERE database = ?1), 0) "
            "AND position IS NULL AND state IN ('pending', 'committed'))",
            (database, after_position),
        )
        return int(count), int(nbytes), None if oldest is None else float(oldest)

    def last_log_id(self) -> int:
        """The log id of the most recent prepare (0 if none): every COMMIT forwarded so far is at or below it."""
        rows = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'change_log'")
        return int(rows[0][0]) if rows else 0

    def settled_through(self) -> int:
        """The highest log id at and below which every record has settled or has its settle queued."""
        # Indexed (change_log_open), no record decoded: result comparison asks per sample. The last id is
        # read first, so a record prepared in between is above it rather than missing from the pending ones.
        # A settle the writer completes meanwhile leaves the set only after the file has it: at worst this
        # answers one settle behind, never ahead.
        last = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'change_log'")
        through = int(last[0][0]) if last else 0
        # Pending records are few (about one per session in its COMMIT): listed, not aggregated.
        for (log_id,) in self._read(
            "SELECT log_id FROM change_log WHERE state = 'pending' AND log_id <= ? ORDER BY log_id", (through,)
        ):
            if log_id not in self._settling:
                return int(log_id) - 1
        return through

    def position_through(self, database: str, log_id: int) -> int | None:
        """The last position of `database` given to a record prepared at or before `log_id` (None: not known yet)."""
        # One statement, so one read snapshot. Positions follow log ids, so the first positioned record after
        # log_id bounds the answer; without one, every position given out belongs to a record at or before it.
        ((pending, after, last),) = self._read(
            "SELECT EXISTS (SELECT 1 FROM change_log WHERE database = ?1 AND log_id <= ?2 AND state = 'pending'), "
            "(SELECT min(position) FROM change_log WHERE database = ?1 AND log_id > ?2 AND position IS NOT NULL), "
            "(SELECT last_position FROM log_head WHERE database = ?1)",
            (database, log_id),
        )
        if pending:
            return None
        if after is not None:
            return int(after) - 1
        return int(last or 0)

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest pending record was prepared (0 if none); a stuck one holds replay back."""
        rows = self._read("SELECT min(prepared_at) FROM change_log WHERE state = 'pending'")
        return max(0.0, time.time() - float(rows[0][0])) if rows and rows[0][0] is not None else 0.0

    def stats(self) -> ChangeLogStats:
        """Counts per state, sizes, commits and health, for status and metrics."""
        with self._counts_lock:
            records, size = dict(self._counts.records), dict(self._counts.size)
        return ChangeLogStats(
            pending=records[LogState.PENDING.value],
            committed=records[LogState.COMMITTED.value],
            aborted=records[LogState.ABORTED.value],
            unresolved=records[LogState.UNRESOLVED.value],
            bytes=sum(size.values()),
            queued=len(self._queue),
            sqlite_commits=self.sqlite_commits,
            errors=self.error_count,
            healthy=self._healthy,
            last_error=self._last_error,
        )

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Write what is queued, then close."""
        self._queue.close()
        if self._writer.is_alive() and threading.current_thread() is not self._writer:
            self._writer.join()
        self._checkpointer.close()
        with self._read_lock:
            self._reader.close()
        with contextlib.suppress(sqlite3.Error):
            # Fold the WAL back into the main file so a closed log is one self-contained file.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        self._lock_file.close()

    def __enter__(self) -> SQLiteChangeLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- error messages --------------------------------------------------------------------------

    def _storage_error(self, exc: sqlite3.Error, action: str) -> ChangeLogError:
        """A ChangeLogError that says what happened to the log file and what the DBA should do."""
        code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        where = f"the change log {self.path}"
        directory = self.path.resolve().parent
        if code == _SQLITE_FULL:
            reason, remedy = self._full_reason_and_remedy(directory)
            return ChangeLogFullError(f"cannot {action} {where}: {reason} ({name}: {exc}). {remedy} {_CONSEQUENCE}")
        if code == _SQLITE_IOERR:
            return ChangeLogIOError(
                f"cannot {action} {where}: the operating system reported a disk I/O error ({name}: {exc}). Check "
                f"the device and filesystem holding {directory} (kernel log: dmesg), then restart pgleap. "
                f"{_CONSEQUENCE}"
            )
        if code == _SQLITE_READONLY:
            return ChangeLogReadOnlyError(
                f"cannot {action} {where}: it is read-only ({name}: {exc}). Make the file, its -wal and -shm "
                f"files and the directory {directory} writable by the user running pgleap, and check that "
                f"filesystem is not mounted read-only. {_CONSEQUENCE}"
            )
        if code == _SQLITE_CANTOPEN:
            return ChangeLogReadOnlyError(
                f"cannot {action} {where}: the file cannot be opened or created ({name}: {exc}). Check that the "
                f"directory {directory} exists and is writable by the user running pgleap, and that its "
                f"filesystem is not read-only."
            )
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return ChangeLogCorruptError(
                f"cannot {action} {where}: the file is damaged or is not a change log ({name}: {exc}). Move it "
                f"(and its -wal and -shm files) aside for inspection; the upgrade must re-copy."
            )
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return ChangeLogLockedError(
                f"cannot {action} {where}: another process holds a lock on it ({name}: {exc}). Make sure no "
                f"other program (a second pgleap, a sqlite3 shell) has it open."
            )
        return ChangeLogError(f"cannot {action} {where}: {name}: {exc}")

    def _os_error(self, exc: OSError, action: str) -> ChangeLogError:
        directory = self.path.resolve().parent
        return ChangeLogReadOnlyError(
            f"cannot {action} the change log {self.path}: {exc.strerror or exc}. Check "
            f"that the directory {directory} exists and is writable by the user "
            f"running pgleap, and that its filesystem is not mounted read-only."
        )

    def _full_reason_and_remedy(self, directory: Path) -> tuple[str, str]:
        free = _free_bytes(directory)
        # SQLITE_FULL means either: tell which, from the free space actually left.
        if self.max_bytes is not None and (free is None or free > _LOW_SPACE):
            return (
                f"it reached its size limit of {self.max_bytes} bytes (max_bytes)",
                "Raise the change log's max_bytes, or let replay catch up so applied records can be truncated.",
            )
        return (
            f"the filesystem holding {directory} is full ({_describe_free(free)})",
            f"Free space on the filesystem holding {directory}, or move the change log to a larger one.",
        )


def _logged(row: tuple[Any, ...]) -> LoggedTransaction:
    log_id, position, state, record = row
    return LoggedTransaction(
        log_id=int(log_id),
        position=None if position is None else int(position),
        state=LogState(state),
        transaction=decode_transaction(record),
    )


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _describe_free(free: int | None) -> str:
    return "free space unknown" if free is None else f"{free} bytes free now"


__all__ = [
    "ChangeLog",
    "ChangeLogClosedError",
    "ChangeLogCorruptError",
    "ChangeLogError",
    "ChangeLogFullError",
    "ChangeLogIOError",
    "ChangeLogLockedError",
    "ChangeLogReadOnlyError",
    "ChangeLogStateError",
    "ChangeLogStats",
    "Durability",
    "SQLiteChangeLog",
]
