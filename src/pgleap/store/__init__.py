"""Durable state of pgleap (SQLite in WAL mode, behind small interfaces)."""

from pgleap.store.state import ChunkRecord, CopyRun, SchemaErrorRecord, StateStore, StoreError

__all__ = ["ChunkRecord", "CopyRun", "SchemaErrorRecord", "StateStore", "StoreError"]
