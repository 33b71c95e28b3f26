"""A client that leaves while its COMMIT is running: the record pgleap logged as pending is settled from the
source (txid_status), so it neither stays pending (which would hold back replay of every later transaction
of the database) nor goes missing. PG 10 source behind a capturing proxy, PG 18 target.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.replay import Replayer

from conftest import CapturingPair, capturing_pair, wait_for

pytestmark = pytest.mark.integration

# A deferred constraint trigger that sleeps makes the COMMIT itself take a second.
SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, note text);
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE PROCEDURE slow();
"""


@pytest.fixture
def env(tmp_path: Path, pg_old: LabServer, target18: LabServer) -> Iterator[CapturingPair]:
    yield from capturing_pair(tmp_path, pg_old, target18, SCHEMA, "orph", CapturingPair)


def test_a_commit_left_by_its_client_is_settled_and_later_transactions_replay(env: CapturingPair) -> None:
    """The leaving client's record is settled as the source decided; a later transaction replays after it."""
    snapshot = env.source.psql("SELECT txid_current_snapshot()", dbname=env.dbname)
    conn = psycopg.connect(env.proxy.dsn())
    conn.execute("INSERT INTO t VALUES (1, 'left during COMMIT')")
    conn.pgconn.send_query(b"COMMIT")  # sent, never read
    conn.pgconn.flush()
    time.sleep(0.3)  # the COMMIT is inside the sleeping trigger now
    conn.pgconn.finish()  # the client is gone
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as later:
        later.execute("SET session_replication_role = replica")  # no slow trigger for this one
        later.execute("INSERT INTO t VALUES (2, 'after')")
    wait_for(lambda: not env.changelog.pending(), "the left COMMIT's record to be settled", timeout=60)
    env.drain()

    async def go() -> int:
        replayer = Replayer(env.upgrade, env.changelog, snapshot)
        try:
            return (await replayer.run_until_caught_up()).applied
        finally:
            replayer.close()

    source_rows = env.source.psql("SELECT count(*) FROM t", dbname=env.dbname)
    # Whatever the source decided for row 1 (its cancel may have rolled it back), the later one replays.
    assert asyncio.run(go()) == int(source_rows)
    assert env.target.psql("SELECT note FROM t WHERE id = 2", dbname=env.dbname) == "after"
    assert env.upgrade.target is not None
    assert not asyncio.run(database_differences(env.upgrade.source, env.upgrade.target))


def test_a_left_commit_is_settled_once_the_source_takes_connections_again(env: CapturingPair) -> None:
    """Settling asks the source again while it refuses connections (a restart, a network gap), not just once."""
    conn = psycopg.connect(env.proxy.dsn())
    conn.execute("INSERT INTO t VALUES (3, 'left while the source refused connections')")
    conn.pgconn.send_query(b"COMMIT")  # sent, never read
    conn.pgconn.flush()
    time.sleep(0.3)  # the COMMIT is inside the sleeping trigger now
    env.source.psql(f"ALTER DATABASE {env.dbname} ALLOW_CONNECTIONS false")
    try:
        conn.pgconn.finish()  # the client is gone: its record is settled from the source, which refuses now
        time.sleep(3)
        assert env.changelog.pending(), "the record was settled while the source refused every connection"
    finally:
        env.source.psql(f"ALTER DATABASE {env.dbname} ALLOW_CONNECTIONS true")
    wait_for(lambda: not env.changelog.pending(), "the left COMMIT's record to be settled", timeout=60)
    committed = env.source.psql("SELECT count(*) FROM t WHERE id = 3", dbname=env.dbname) == "1"
    logged = [r.transaction.txid for r in env.changelog.read_committed("app", 0, 100)]
    assert len(logged) == (1 if committed else 0), f"source committed: {committed}; log holds {logged}"


def test_recovery_keeps_one_of_two_pending_records_of_one_txid(tmp_path: Path, pg_old: LabServer) -> None:
    """A transaction logged twice (two pending records of one committed txid) is applied once, in the first's place."""
    from pgleap.store import CapturedStatement, CapturedTransaction, LogState, SQLiteChangeLog
    from pgleap.upgrade.capture.recovery import settle_pending

    from conftest import server_config

    with psycopg.connect(pg_old.dsn("postgres"), autocommit=True) as conn:
        txid = conn.execute("SELECT txid_current()").fetchone()[0]  # committed at once (autocommit)
        with pytest.raises(psycopg.errors.RaiseException), conn.transaction():
            aborted = conn.execute("SELECT txid_current()").fetchone()[0]
            conn.execute("DO $$ BEGIN RAISE 'roll back'; END $$")

    def tx(n: int) -> CapturedTransaction:
        statement = CapturedStatement("SELECT 1", tag="SELECT 1")
        return CapturedTransaction("app", n, None, (), (statement,), session_id=1)

    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            for n in (txid, txid, aborted):
                await log.prepare(tx(n))
            report = await settle_pending(log, server_config(pg_old, "postgres"), log.pending(), "app")
            assert report.settled == {LogState.COMMITTED: 1, LogState.ABORTED: 2}
            assert [(r.log_id, r.transaction.txid) for r in log.read_committed("app", 0, 10)] == [(1, txid)]

    asyncio.run(run())
