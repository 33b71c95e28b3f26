"""Issue 4's bar, end to end: a live workload through pgleap while the copy runs; after the drain the
target equals the source row by row, with no re-sync at all; and the same with pgleap killed (-9) and
restarted in the middle while the clients reconnect and go on.

Source PG 10, target PG 18. The workload is pgbench TPC-B (prepared statements) plus four clients of
every shape the issue names: serial keys under concurrency and rollbacks, `DEFAULT now()`, `now()` in
UPDATE, explicit transactions with savepoints, extended protocol with parameters, COPY FROM STDIN, and
an upsert. The copy reads the source at an exported snapshot S while all of it runs; replay starts
from S once the copy is done.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.config import UpgradeConfig
from pgleap.lab import LabServer
from pgleap.store import StateStore
from pgleap.testing import ProxyProcess
from pgleap.upgrade.copy import CopyJob, CopyOptions
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.replay import ApplyJournal

from conftest import ReconnectingWriters, pgbench_database, server_config, show, tool, wait_for

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE orders (id serial PRIMARY KEY, worker int NOT NULL, created timestamptz NOT NULL DEFAULT now(),
                     amount numeric(12,2), tags text[], note text);
CREATE TABLE accounts (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, touched timestamptz);
INSERT INTO accounts (id) SELECT g FROM generate_series(1, 20) g;
CREATE TABLE events (id bigint PRIMARY KEY, worker int NOT NULL, payload jsonb);
CREATE TABLE tallies (k text PRIMARY KEY, n int NOT NULL, seen timestamptz NOT NULL DEFAULT now());
"""


@pytest.fixture
def source_db(pg_old: LabServer) -> Iterator[str]:
    """A PG 10 database with pgbench's tables (scale 1) and SCHEMA."""
    yield from pgbench_database(pg_old, "e2e", 1, SCHEMA)


def write_one(conn: psycopg.Connection[Any], worker: int, i: int) -> bool:
    """One unit of every shape the issue names; True when it committed."""
    kind = i % 6
    conn.autocommit = kind in (0, 4, 5)
    if kind == 0:  # autocommit INSERT: serial key and DEFAULT now()
        conn.execute("INSERT INTO orders (worker, note) VALUES (%s, 'auto')", (worker,))
    elif kind == 1:  # explicit: RETURNING, now() in UPDATE, a savepoint rolled back after using the sequence
        with conn.transaction():
            (new_id,) = conn.execute(
                "INSERT INTO orders (worker, amount) VALUES (%s, %s) RETURNING id", (worker, i / 7)
            ).fetchone() or (None,)
            assert new_id is not None
            conn.execute("UPDATE accounts SET n = n + 1, touched = now() WHERE id = %s", (i % 20 + 1,))
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO orders (worker, note) VALUES (%s, 'undone')", (worker,))
                    conn.execute("INSERT INTO orders (id, worker) VALUES (%s, 0)", (new_id,))
            except psycopg.errors.UniqueViolation:
                pass
    elif kind == 2:  # a whole transaction rolled back, its sequence values consumed
        conn.execute("BEGIN")
        conn.execute("INSERT INTO orders (worker, note) VALUES (%s, 'rolled back')", (worker,))
        conn.execute("ROLLBACK")
    elif kind == 3:  # COPY FROM STDIN with explicit keys
        with conn.transaction(), conn.cursor().copy("COPY events (id, worker, payload) FROM STDIN") as copy:
            for j in range(3):
                copy.write_row((worker * 10_000_000 + i * 10 + j, worker, f'{{"i": {i}, "j": {j}}}'))
    elif kind == 4:  # extended protocol with parameters of several types
        conn.execute(
            "INSERT INTO orders (worker, amount, tags) VALUES (%s, %s, %s)", (worker, i * 0.25, [f"t{i}", "x"])
        )
    else:  # an upsert with now()
        conn.execute(
            "INSERT INTO tallies AS t (k, n) VALUES (%s, 1) ON CONFLICT (k) DO UPDATE SET n = t.n + 1, seen = now()",
            (f"k{i % 7}",),
        )
    return kind != 2


def pgbench(dsn: str, seconds: int) -> subprocess.Popen[str]:
    """TPC-B through pgleap with prepared statements, in the background."""
    return subprocess.Popen(
        [tool("pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(seconds), "-M", "prepared", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def copy_now(upgrade: UpgradeConfig, state_path: Path) -> str:
    """`pgleap copy` from the source at an exported snapshot, while the workload runs; returns S."""
    store = StateStore(state_path)
    try:
        options = CopyOptions(parallel_workers=2, split_threshold_bytes=2_000_000, chunk_bytes=2_000_000)
        report = asyncio.run(CopyJob(upgrade, store, options).run())
    finally:
        store.close()
    assert report.snapshot, report
    return report.snapshot


def replay_caught_up(console: psycopg.Connection[Any]) -> dict[str, Any] | None:
    (row,) = show(console, "SHOW REPLAY")
    done = row["running"] == "t" and row["lag_transactions"] == "0" and row["applied_position"] == row["last_position"]
    return row if done else None


@pytest.mark.parametrize("crash", [False, True], ids=["steady", "kill9"])
def test_live_workload_during_copy_replays_to_equal_tables(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer, crash: bool
) -> None:
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    upgrade = UpgradeConfig(database="app", source=source, target=target_config)
    state, changes = tmp_path / "state.db", tmp_path / "changes.db"
    # A wide group-commit window widens the moment between a client's COMMIT answer and its record's
    # settle: SHOW REPLAY once said lag 0 in it, and this test compared tables one transaction early.
    extra = f'state_path = "{state}"\nchangelog_path = "{changes}"\ndurability = "batch"\nbatch_interval = "100ms"'
    runs = [tmp_path / "one", tmp_path / "two"]
    for run in runs:
        run.mkdir()
    pgleap = ProxyProcess(runs[0], {"app": source}, extra=extra, targets={"app": target_config})
    second: ProxyProcess | None = None
    admin = {"database": "pgleap", "user": "pgleap_admin", "password": "admin-secret"}
    try:
        pgleap.wait_accepting()
        with psycopg.connect(pgleap.dsn(**admin), autocommit=True) as console:
            console.execute("START CAPTURE")
        workload = ReconnectingWriters(pgleap.dsn(), 4, write_one)
        workload.start()
        bench = pgbench(pgleap.dsn(), 12 if crash else 20)
        time.sleep(1)
        copy_now(upgrade, state)
        with psycopg.connect(pgleap.dsn(**admin), autocommit=True) as console:
            console.execute("START REPLAY")
        time.sleep(3)
        if crash:
            pgleap.kill()
            bench.wait(60)  # pgbench gives up on a lost connection; a new run goes to the new pgleap
            second = ProxyProcess(runs[1], {"app": source}, extra=extra, targets={"app": target_config})
            second.wait_accepting()
            workload.dsn = second.dsn()
            with psycopg.connect(second.dsn(**admin), autocommit=True) as console:
                console.execute("START REPLAY")
            bench = pgbench(second.dsn(), 8)
        out, _ = bench.communicate(timeout=120)
        workload.join()
        assert not workload.errors, workload.errors
        assert workload.committed > 100, workload.committed
        assert "number of transactions actually processed" in out, out
        if crash:
            assert workload.reconnects >= 1
        live = second or pgleap
        with psycopg.connect(live.dsn(**admin), autocommit=True) as console:
            row = wait_for(lambda: replay_caught_up(console), "replay to catch up", timeout=120)
            (capture,) = show(console, "SHOW CAPTURE")
        assert row["divergences"] == "0" and row["apply_errors"] == "0" and row["paused_error"] is None, row
        assert int(row["applied"]) > 100
        assert capture["inserts_without_image"] == "0", capture
    finally:
        for process in (pgleap, second):
            if process is not None:
                process.stop()
    journal = ApplyJournal(changes.with_name(changes.stem + ".journal.db"))
    try:
        assert journal.resync_tables("app") == [], "replay asked for a re-sync"
    finally:
        journal.close()
    problems = asyncio.run(database_differences(source, target_config))
    assert not problems, "\n".join(problems)
