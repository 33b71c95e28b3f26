"""Durable state of pgleap (SQLite in WAL mode, behind small interfaces)."""

from pgleap.store.changelog import (
    ChangeLog,
    ChangeLogClosedError,
    ChangeLogCorruptError,
    ChangeLogError,
    ChangeLogFullError,
    ChangeLogIOError,
    ChangeLogLockedError,
    ChangeLogReadOnlyError,
    ChangeLogStateError,
    ChangeLogStats,
    Durability,
    SQLiteChangeLog,
)
from pgleap.store.records import (
    CapturedStatement,
    CapturedTransaction,
    LoggedTransaction,
    LogState,
    RecordFormatError,
    decode_transaction,
    encode_transaction,
)
from pgleap.store.state import ChunkRecord, CopyRun, SchemaErrorRecord, StateStore, StoreError

__all__ = [
    "CapturedStatement",
    "CapturedTransaction",
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
    "ChunkRecord",
    "CopyRun",
    "Durability",
    "LogState",
    "LoggedTransaction",
    "RecordFormatError",
    "SQLiteChangeLog",
    "SchemaErrorRecord",
    "StateStore",
    "StoreError",
    "decode_transaction",
    "encode_transaction",
]
