"""I4 end to end: pgleap is killed (-9) under a concurrent write workload, restarted, and nothing is lost.

`pgleap run` captures a PG 10 source while four clients write (explicit transactions and
autocommit statements). Half-way, pgleap is killed with SIGKILL; a new pgleap starts on the same
state store and change log, resumes capture by itself and settles the records the crash left
pending from the source's txid_status; the clients reconnect and go on. After the drain, the
log is replayed on a PG 18 target, and every table equals the source row by row.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.config import UpgradeConfig
from pgleap.lab import Lab, LabServer
from pgleap.store import SQLiteChangeLog
from pgleap.testing import ProxyProcess
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.replay import Replayer, ReplayStatus

from conftest import ReconnectingWriters, server_config

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE acct (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO acct SELECT g, 0 FROM generate_series(0, 49) g;
CREATE TABLE hist (id bigint PRIMARY KEY, worker int NOT NULL, i int NOT NULL, note text, ts timestamptz);
"""
WORKERS = 4


@pytest.fixture
def databases(pg_old: LabServer, lab: Lab) -> Iterator[tuple[str, LabServer]]:
    """One database with SCHEMA on the PG 10 source and on a PG 18 target."""
    target = lab.target(18)
    name = f"crash_{uuid.uuid4().hex[:8]}"
    for server in (pg_old, target):
        server.psql(f"CREATE DATABASE {name}")
        server.psql(SCHEMA, dbname=name)
    try:
        yield name, target
    finally:
        pg_old.psql(f"DROP DATABASE IF EXISTS {name}")
        target.stop()


def write_one(conn: psycopg.Connection[Any], worker: int, i: int) -> bool:
    """One unit of the workload: an autocommit INSERT, or an explicit transaction with a failing savepoint."""
    key = worker * 1_000_000 + i
    if i % 3 == 0:
        conn.autocommit = True  # an implicit transaction: pgleap commits it itself once logged
        conn.execute("INSERT INTO hist VALUES (%s, %s, %s, 'autocommit', now())", (key, worker, i))
        conn.autocommit = False
        return False
    with conn.transaction():
        conn.execute("INSERT INTO hist VALUES (%s, %s, %s, 'explicit', now())", (key, worker, i))
        conn.execute("UPDATE acct SET n = n + 1 WHERE id = %s", (i % 50,))
        if i % 5 == 0:
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute("INSERT INTO hist VALUES (%s, %s, %s, 'undone', now())", (key, worker, i))
    return True


def test_kill9_under_load_loses_nothing(tmp_path: Path, pg_old: LabServer, databases: tuple[str, LabServer]) -> None:
    name, target = databases
    source = server_config(pg_old, name)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
    first = ProxyProcess(tmp_path / "one", {"app": source}, extra=extra)
    second: ProxyProcess | None = None
    try:
        first.wait_accepting()
        admin = first.dsn(database="pgleap", user="pgleap_admin", password="admin-secret")
        with psycopg.connect(admin, autocommit=True) as console:
            console.execute("START CAPTURE")
        # Every session connects after capture started, so S taken now splits the log exactly.
        snapshot = pg_old.psql("SELECT txid_current_snapshot()", dbname=name)
        clients = ReconnectingWriters(first.dsn(), WORKERS, write_one)
        clients.start()
        time.sleep(3)
        first.kill()
        second = ProxyProcess(tmp_path / "two", {"app": source}, extra=extra)
        second.wait_accepting()
        clients.dsn = second.dsn()
        time.sleep(3)
        clients.join()
        assert not clients.errors, clients.errors
        assert clients.committed > 50 and clients.reconnects >= 1
        assert "resuming capture" in second.output()
        second.stop()
        assert second.proc.returncode == 0, second.output()
    finally:
        first.stop()
        if second is not None:
            second.stop()

    changelog = SQLiteChangeLog(tmp_path / "changes.db")
    try:
        assert changelog.pending() == [], "records left pending after the restart settled them"
        assert changelog.unresolved() == []  # PG 10 has txid_status: every outcome is known
        upgrade = UpgradeConfig(database="app", source=source, target=server_config(target, name))
        status = asyncio.run(_replay(Replayer(upgrade, changelog, snapshot)))
        assert status.paused is None and status.divergences == 0, status
        assert status.applied > 50
    finally:
        changelog.close()
    problems = asyncio.run(database_differences(source, server_config(target, name)))
    assert not problems, "\n".join(problems)


async def _replay(replayer: Replayer) -> ReplayStatus:
    try:
        return await replayer.run_until_caught_up()
    finally:
        replayer.close()
