"""The state store: runs, steps, chunks and schema errors survive reopening; a new run forgets the old one."""

from __future__ import annotations

from pathlib import Path

from pgleap.store import ChunkRecord, SchemaErrorRecord, StateStore

from conftest import older_sqlite_file


def _chunk(i: int) -> ChunkRecord:
    return ChunkRecord(
        chunk_id=f"public.t#{i}",
        schema_name="public",
        table_name="t",
        kind="key",
        lower=str(i * 10),
        upper=str(i * 10 + 10),
        est_rows=10,
        est_bytes=1000,
        flags="no_pk",
    )


def test_chunk_lifecycle_survives_reopen(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    store.start_run("app", "replica")
    store.set_snapshot("app", "10:12:11", "0/3000000", "2024-01-01")
    store.add_chunks("app", [_chunk(0), _chunk(1)])
    store.mark_chunk_inflight("app", "public.t#0", 1234)
    store.mark_chunk_inflight_counts("app", "public.t#0", 10, 500, 0.1)
    store.mark_step("app", "data", "started")
    store.add_schema_error("app", SchemaErrorRecord("pre-data", "FUNCTION f()", "ERROR: x", "CREATE FUNCTION f()"))
    store.close()

    again = StateStore(tmp_path / "s.db")
    run = again.run("app")
    assert run is not None and run.snapshot == "10:12:11" and run.snapshot_lsn == "0/3000000"
    first, second = again.chunks("app")
    assert (first.status, first.target_txid, first.rows) == ("inflight", 1234, 10)
    assert second.status == "pending" and first.flag_set == {"no_pk"}
    assert again.step_status("app", "data") == "started"
    again.mark_chunk_done("app", "public.t#0", 10, 500, 0.1)
    again.mark_chunk_pending("app", "public.t#1")
    assert [c.status for c in again.chunks("app")] == ["done", "pending"]
    assert again.schema_errors("app")[0].object == "FUNCTION f()"

    new = again.start_run("app", "primary", "replay was resumed")
    assert new.run_id == 2 and new.restart_reason == "replay was resumed"
    assert again.chunks("app") == [] and again.schema_errors("app") == [] and again.step_status("app", "data") is None
    again.close()


def test_wal_mode(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"
    store.close()


def test_a_store_from_before_target_oid_gains_the_column_and_keeps_its_run(tmp_path: Path) -> None:
    """An older pgleap's copy_run has no target_oid: opening adds it, the run reads back with None."""
    path = older_sqlite_file(
        tmp_path / "old.db",
        "CREATE TABLE copy_run (database TEXT PRIMARY KEY, run_id INTEGER NOT NULL, mode TEXT NOT NULL, "
        "snapshot TEXT, snapshot_lsn TEXT, replica_start TEXT, status TEXT NOT NULL, started_at REAL NOT NULL, "
        "finished_at REAL, restart_reason TEXT);"
        "INSERT INTO copy_run VALUES ('app', 3, 'primary', '10:12:11', NULL, NULL, 'done', 1.0, 2.0, NULL);",
    )
    store = StateStore(path)
    run = store.run("app")
    assert run is not None and (run.run_id, run.snapshot, run.target_oid) == (3, "10:12:11", None)
    assert store.start_run("app", "primary", target_oid=16384).target_oid == 16384
    store.close()
    again = StateStore(path)
    run = again.run("app")
    again.close()
    assert run is not None and run.target_oid == 16384
