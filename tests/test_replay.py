"""Replay on real servers: a change log captured through the proxy on PG 10, applied on PG 18.

Each test builds its own source and target databases, runs a deterministic workload (explicit keys,
no volatile defaults) through a capturing proxy, replays the log and compares every table row by row.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.replay import ApplyJournal, ErrorKind, Replayer, ReplayError, ReplayStatus

from conftest import CapturingPair, capturing_pair, tool

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, worker int NOT NULL, qty int NOT NULL, note text, price numeric(10,2),
                    tags text[], ts timestamptz);
CREATE TABLE events (id int PRIMARY KEY, payload jsonb, b bytea);
CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO counter VALUES (1, 0);
"""


class Env(CapturingPair):
    """The pair, with what the replay tests read from it."""

    def snapshot(self) -> str:
        """txid_current_snapshot() on the source, now."""
        return self.source.psql("SELECT txid_current_snapshot()", dbname=self.dbname)

    def counter(self, server: LabServer) -> int:
        """The counter every committed workload transaction increments."""
        return int(server.psql("SELECT n FROM counter", dbname=self.dbname))


@pytest.fixture
def env(tmp_path: Path, pg_old: LabServer, target18: LabServer) -> Iterator[Env]:
    """PG 10 source database with SCHEMA behind a capturing proxy; the same schema on the PG 18 target."""
    yield from capturing_pair(tmp_path, pg_old, target18, SCHEMA, "rp", Env)


def workload(dsn: str, worker: int, count: int) -> int:
    """Deterministic writes of every shape capture handles; returns how many transactions committed."""
    committed = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(count):
            key = worker * 100_000 + i
            kind = i % 6
            if kind == 0:  # extended protocol with text parameters of several types
                with conn.transaction():
                    conn.execute(
                        "insert into items (id, worker, qty, note, price, tags) values (%s, %s, %s, %s, %s, %s)",
                        (key, worker, i, f"note {i}", Decimal(i) / 4, ["a", str(i)]),
                    )
                    conn.execute("update counter set n = n + 1 where id = 1")
            elif kind == 1:  # explicit transaction with a rolled-back savepoint
                with conn.transaction():
                    conn.execute("update items set qty = qty + 10, note = note || ' updated' where id = %s", (key - 1,))
                    try:
                        with conn.transaction():
                            conn.execute("insert into items (id, worker, qty) values (%s, %s, 0)", (key - 1, worker))
                    except psycopg.errors.UniqueViolation:
                        pass
                    conn.execute("update counter set n = n + 1 where id = 1")
            elif kind == 2:  # simple protocol: one implicit transaction of two statements
                conn.execute(
                    f"insert into items (id, worker, qty, note) values ({key}, {worker}, {i}, 'multi ''q''');"
                    "update counter set n = n + 1 where id = 1"
                )
            elif kind == 3:  # COPY FROM STDIN, then binary parameters
                with conn.transaction():
                    with conn.cursor().copy("copy events (id, payload, b) from stdin") as copy:
                        copy.write_row((key, json.dumps({"w": worker, "i": i}), bytes([i % 256, 0, 255])))
                        copy.write_row((key + 50_000, None, None))
                    conn.execute("update events set b = %b where id = %b", (b"\x00\x01binary", key + 50_000))
                    conn.execute("update counter set n = n + 1 where id = 1")
            elif kind == 4:  # rolled back: must never reach the target
                with conn.transaction():
                    conn.execute("insert into items (id, worker, qty) values (%s, %s, -1)", (key, worker))
                    conn.execute("update counter set n = n + 1000 where id = 1")
                    raise psycopg.Rollback()
            else:  # a session setting that changes what a literal means, and a delete
                with conn.transaction():
                    conn.execute("set local timezone = 'Asia/Kolkata'")
                    conn.execute("update items set ts = '2024-01-02 03:04:05' where id = %s", (key - 3,))
                    conn.execute("delete from items where id = %s", (key - 5,))
                    conn.execute("update counter set n = n + 1 where id = 1")
            if kind != 4:
                committed += 1
    return committed


def run_workers(dsn: str, workers: int, count: int) -> int:
    """`workers` concurrent sessions running `workload`; committed transactions in total."""
    results: list[int] = []
    errors: list[BaseException] = []

    def one(worker: int) -> None:
        try:
            results.append(workload(dsn, worker, count))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(w + 1,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return sum(results)


async def _connect(server: ServerConfig) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=server.host, port=server.port, user=server.user, password=server.password, database=server.database
    )


def assert_equal(env: Env) -> None:
    """Every source table equals the target's, row by row."""
    assert env.upgrade.target is not None
    problems = asyncio.run(database_differences(env.upgrade.source, env.upgrade.target))
    assert not problems, "\n".join(problems)


def write_through_proxy(env: Env, *statements: str) -> None:
    """Each statement in its own autocommit transaction through the capturing proxy, then the log drained."""
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)  # type: ignore[arg-type]
    env.drain()


def replay(env: Env, snapshot: str, **options: object) -> tuple[ReplayStatus, Replayer]:
    """Run a Replayer until caught up (or paused); its connection is closed afterwards."""

    async def go() -> tuple[ReplayStatus, Replayer]:
        settings = {"max_retries": 5, **options}
        replayer = Replayer(env.upgrade, env.changelog, snapshot, **settings)  # type: ignore[arg-type]
        try:
            return await replayer.run_until_caught_up(), replayer
        finally:
            replayer.close()

    return asyncio.run(go())


def on_both(env: Env, sql: str) -> None:
    """`sql` on the source and on the target, directly (the same schema on both, as a copy leaves it)."""
    for server in (env.source, env.target):
        server.psql(sql, dbname=env.dbname)


def replay_flagging(env: Env, snapshot: str) -> tuple[ReplayStatus, ApplyJournal]:
    """Replay until caught up, into a journal of its own: the status and what it flagged for re-sync."""
    journal = ApplyJournal()
    status, _ = replay(env, snapshot, journal=journal)
    return status, journal


def test_replay_applies_the_captured_workload(env: Env) -> None:
    """Everything after S is applied once, in order, batched; the tables end equal; lag is zero."""
    snapshot = env.snapshot()
    committed = run_workers(env.proxy.dsn(), workers=3, count=60)
    env.drain()
    logged = env.changelog.last_position("app")
    assert logged == committed
    before = Replayer(env.upgrade, env.changelog, snapshot).lag()
    assert before.transactions == committed and before.bytes > 0 and before.seconds > 0 and before.apply_rate == 0
    status, replayer = replay(env, snapshot, batch_size=25)
    assert status.applied == committed and status.skipped_in_snapshot == 0 and status.paused is None
    assert status.applied_position == logged and status.divergences == 0
    assert env.counter(env.target) == env.counter(env.source) == committed
    assert_equal(env)
    lag = replayer.lag()
    assert (lag.transactions, lag.bytes, lag.seconds) == (0, 0, 0.0) and lag.apply_rate > 0
    stored = env.target.psql("SELECT position FROM pgleap.applied WHERE database = 'app'", dbname=env.dbname)
    assert stored == str(logged)
    # A second replayer finds everything applied: nothing is applied twice.
    again, _ = replay(env, snapshot)
    assert again.applied == 0 and again.applied_position == logged
    assert env.counter(env.target) == committed


def test_a_latin1_session_replays_its_parameters_and_copy_data_as_the_source_read_them(env: Env) -> None:
    """Bind parameters and COPY data arrive in client_encoding; replay's session speaks UTF-8."""
    snapshot = env.snapshot()
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("set client_encoding to 'LATIN1'")
        assert conn.info.encoding == "iso8859-1"
        with conn.transaction():
            conn.execute("insert into items (id, worker, qty) values (1, 0, 0), (2, 0, 0)")
            # UPDATEs replay as statements with their parameters: one in text format, one in binary (text type).
            conn.execute("update items set note = %s where id = %s", ("café crème", 1))
            conn.execute("update items set note = %b where id = %b", ("naïve façade", 2))
            with conn.cursor().copy("copy items (id, worker, qty, note) from stdin") as copy:
                copy.write_row((3, 0, 0, "Zürich, Ærø"))
            conn.execute("update counter set n = n + 1 where id = 1")
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn, conn.transaction():
        # For one transaction only: replay must not run this SET LOCAL (its session stays UTF-8).
        conn.execute("set local client_encoding to 'WIN1252'")
        conn.execute("update items set note = note || %s where id = %s", (" €", 3))
    env.drain()
    status, _ = replay(env, snapshot)
    assert status.paused is None and status.divergences == 0, status
    assert status.applied == 2
    notes = env.target.psql("select string_agg(note, '|' order by id) from items", dbname=env.dbname)
    assert notes == "café crème|naïve façade|Zürich, Ærø €"
    assert_equal(env)
    assert env.capture.problems == []


def test_a_write_whose_portal_the_client_never_finishes_is_replayed(env: Env) -> None:
    """An UPDATE ... RETURNING fetched with a row limit, then committed: no CommandComplete ever comes."""
    snapshot = env.snapshot()

    async def go() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=env.proxy.port, user="app", password="app-secret", database="app"
        )
        try:
            await conn.execute("insert into items (id, worker, qty) select g, 0, 0 from generate_series(1, 10) g")
            async with conn.transaction():
                cursor = await conn.cursor("update items set qty = qty + 1 where worker = 0 returning id")
                assert len(await cursor.fetch(3)) == 3  # Execute with a row limit: PortalSuspended
                await conn.execute("update counter set n = n + 1 where id = 1")
            async with conn.transaction():  # resumed to its end: still logged once
                cursor = await conn.cursor("update items set qty = qty + 10 where id <= 4 returning id")
                assert len(await cursor.fetch(2)) == 2
                assert len(await cursor.fetch(10)) == 2
        finally:
            await conn.close()

    asyncio.run(go())
    env.drain()
    status, _ = replay(env, snapshot)
    assert status.paused is None and status.divergences == 0, status
    assert status.applied == 3
    assert env.target.psql("select sum(qty) from items", dbname=env.dbname) == "50"
    assert_equal(env)
    assert env.capture.problems == []


async def _copy_at_snapshot(env: Env) -> str:
    """Copy every table source -> target in one REPEATABLE READ snapshot; returns that snapshot S."""
    upgrade = env.upgrade
    assert upgrade.target is not None
    source, target = await _connect(upgrade.source), await _connect(upgrade.target)
    try:
        await target.execute("TRUNCATE items, events, counter")
        async with source.transaction(isolation="repeatable_read", readonly=True):
            snapshot: str = await source.fetchval("SELECT txid_current_snapshot()::text")
            for table in ("items", "events", "counter"):
                rows = await source.fetch(f"SELECT * FROM {table}")
                await target.copy_records_to_table(table, records=[tuple(r) for r in rows])
        return snapshot
    finally:
        await source.close()
        await target.close()


def test_snapshot_taken_mid_workload_stitches_exactly(env: Env) -> None:
    """Copy at S while traffic runs: transactions visible in S are skipped, the rest applied; tables equal."""
    done = threading.Event()
    totals: list[int] = []

    def traffic() -> None:
        try:
            totals.append(run_workers(env.proxy.dsn(), workers=3, count=80))
        finally:
            done.set()

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        _wait_for(lambda: env.counter(env.source) >= 60 or done.is_set(), 30)
        snapshot = asyncio.run(_copy_at_snapshot(env))
        assert not done.is_set(), "the workload ended before S was taken; make it longer"
    finally:
        thread.join()
    env.drain()
    status, _ = replay(env, snapshot, batch_size=16)
    assert status.skipped_in_snapshot > 0 and status.applied > 0
    assert status.applied + status.skipped_in_snapshot == totals[0] == env.changelog.last_position("app")
    assert env.counter(env.target) == env.counter(env.source) == totals[0]
    assert_equal(env)


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.02)


async def _until(condition: Callable[[], bool], timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail("replay did not get there in time")
        await asyncio.sleep(0.001)


def _reached(replayer: Replayer, position: int) -> bool:
    return replayer.position >= position


def _reconnected(replayer: Replayer, old_pid: int) -> bool:
    return replayer.backend_pid not in (None, old_pid)


async def _block_replay(locker: asyncpg.Connection, admin: asyncpg.Connection, replayer: Replayer) -> int:
    """Make the replayer's next batch wait inside its target transaction; returns its backend pid."""
    await locker.execute("BEGIN; LOCK TABLE counter IN ACCESS EXCLUSIVE MODE")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        pid = replayer.backend_pid
        waiting = "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted"
        if pid is not None and await admin.fetchval(waiting, pid):
            return pid
        if loop.time() > deadline:
            pytest.fail("the replayer never blocked on the locked table")
        await asyncio.sleep(0.005)


def test_crashes_during_replay_lose_and_repeat_nothing(env: Env) -> None:
    """Mid-transaction: connection killed, pgleap's replayer killed (task cancelled), target crashed; exact."""
    snapshot = env.snapshot()
    committed = run_workers(env.proxy.dsn(), workers=3, count=100)
    env.drain()
    total = env.changelog.last_position("app")
    upgrade = env.upgrade
    assert upgrade.target is not None
    target = upgrade.target

    async def go() -> tuple[int, int]:
        options = {"batch_size": 3, "backoff_initial": 0.02, "backoff_max": 0.3, "max_retries": 200}
        stop = asyncio.Event()
        replayer = Replayer(upgrade, env.changelog, snapshot, **options)  # type: ignore[arg-type]
        task = asyncio.create_task(replayer.run(stop))
        admin, locker = await _connect(target), await _connect(target)
        try:
            # 1. The backend is killed while its batch is open on the target (blocked on a lock).
            await _until(partial(_reached, replayer, total // 8))
            pid = await _block_replay(locker, admin, replayer)
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await locker.execute("ROLLBACK")
            await _until(partial(_reconnected, replayer, pid))
            # 2. Killed again, wherever it is.
            await _until(partial(_reached, replayer, total // 4))
            await admin.execute("SELECT pg_terminate_backend($1)", replayer.backend_pid)
            # 3. pgleap dies: the task is cancelled mid-batch, a new replayer starts from the target's position.
            await _until(partial(_reached, replayer, total // 2))
            await _block_replay(locker, admin, replayer)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            first_retries = replayer.retries
            replayer.close()
            await locker.execute("ROLLBACK")
            replayer = Replayer(upgrade, env.changelog, snapshot, **options)  # type: ignore[arg-type]
            task = asyncio.create_task(replayer.run(stop))
            # 4. The target crashes (immediate stop) while a batch is open, and comes back on the same port.
            await _until(partial(_reached, replayer, (3 * total) // 4))
            await _block_replay(locker, admin, replayer)
            assert replayer.position < total
            await asyncio.to_thread(env.target.stop, "immediate")
            await asyncio.sleep(0.2)
            await asyncio.to_thread(env.target.start)
            await _until(partial(_reached, replayer, total))
            stop.set()
            await task
            return first_retries, replayer.retries
        finally:
            stop.set()
            if not task.done():
                task.cancel()
            replayer.close()
            for conn in (admin, locker):
                conn.terminate()

    first_retries, second_retries = asyncio.run(go())
    assert first_retries >= 2 and second_retries >= 1
    assert env.counter(env.target) == env.counter(env.source) == committed
    assert_equal(env)


def _error_workload(env: Env) -> None:
    """Three transactions; the second writes a table the target does not have."""
    env.source.psql("CREATE TABLE only_src (id int PRIMARY KEY)", dbname=env.dbname)
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("insert into items (id, worker, qty) values (1, 0, 1)")
        with conn.transaction():
            conn.execute("insert into items (id, worker, qty) values (2, 0, 2)")
            conn.execute("insert into only_src values (%s)", (2,))
        conn.execute("insert into items (id, worker, qty) values (3, 0, 3)")
        conn.execute("update counter set n = n + 1")
    env.drain()


def test_apply_error_pauses_then_resumes_once_fixed(env: Env, tmp_path: Path) -> None:
    snapshot = env.snapshot()
    _error_workload(env)
    journal = ApplyJournal(tmp_path / "journal.db")

    async def go() -> tuple[ReplayStatus, ReplayStatus]:
        replayer = Replayer(env.upgrade, env.changelog, snapshot, batch_size=10, journal=journal, max_retries=5)
        try:
            paused = await replayer.run_until_caught_up()
            env.target.psql("CREATE TABLE only_src (id int PRIMARY KEY)", dbname=env.dbname)
            replayer.resume()
            return paused, await replayer.run_until_caught_up()
        finally:
            replayer.close()

    paused, resumed = asyncio.run(go())
    error = paused.paused
    assert error is not None and error.position == 2 and error.sqlstate == "42P01" and error.action == "paused"
    assert error.kind is ErrorKind.FEATURE_INCOMPATIBILITY and "only_src" in error.statement
    assert paused.applied_position == 1 and paused.applied == 1  # the one before it, found by the one-by-one pass
    assert journal.errors("app") == [error]
    assert resumed.paused is None and resumed.applied_position == 4
    assert_equal(env)
    journal.close()


def test_apply_error_skip_and_resync(env: Env) -> None:
    snapshot = env.snapshot()
    # A row only the target has: the UPDATE's tag differs (a divergence), the rest still applies.
    env.target.psql("INSERT INTO items (id, worker, qty) VALUES (99, 0, 0)", dbname=env.dbname)
    _error_workload(env)
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("update items set qty = qty + 1 where id in (1, 99)")
    env.drain()
    journal = ApplyJournal()
    status, _ = replay(env, snapshot, batch_size=10, on_apply_error="skip_and_resync", journal=journal)
    assert status.paused is None and status.skipped_on_error == 1 and status.applied == 4
    assert status.applied_position == 5 and status.divergences == 1
    (error,) = journal.errors("app")
    assert error.action == "skipped" and error.position == 2 and error.sqlstate == "42P01"
    assert set(error.resync_tables) == {"items", "only_src"} == set(journal.resync_tables("app"))
    assert journal.required_resyncs("app") == ["items", "only_src"]  # cutover waits for their re-sync
    (divergence,) = journal.divergences("app")
    assert (divergence.source_tag, divergence.target_tag) == ("UPDATE 1", "UPDATE 2")
    rows = env.target.psql("SELECT id, qty FROM items ORDER BY id", dbname=env.dbname)
    assert rows.split("\n") == ["1|2", "3|3", "99|1"]  # row 2 was in the skipped transaction


INDIRECT_SCHEMA = """
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE CASCADE);
CREATE TABLE grandchild (id int PRIMARY KEY, child_id int REFERENCES child ON DELETE SET NULL);
CREATE TABLE audit_log (id serial PRIMARY KEY, note text);
CREATE TABLE audited (id int PRIMARY KEY, n int);
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO audit_log (note) VALUES (TG_OP); RETURN NEW; END $$;
CREATE TRIGGER audit AFTER UPDATE ON audited FOR EACH ROW EXECUTE PROCEDURE audit();
CREATE TABLE counters (id int PRIMARY KEY, n int);
CREATE FUNCTION next_no() RETURNS int LANGUAGE sql AS $$ UPDATE counters SET n = n + 1 WHERE id = 1 RETURNING n $$;
CREATE TABLE plain (id int PRIMARY KEY, n int);
INSERT INTO parent VALUES (1), (2);
INSERT INTO child VALUES (10, 1), (20, 2);
INSERT INTO grandchild VALUES (100, 10);
INSERT INTO audited VALUES (1, 0);
INSERT INTO counters VALUES (1, 0);
INSERT INTO plain VALUES (1, 0);
"""


def test_a_skipped_transaction_flags_what_its_writes_changed_beyond_the_tables_they_name(env: Env) -> None:
    """ON DELETE CASCADE and SET NULL reach their tables at any depth; a trigger or a function that writes may
    have changed any table. Skipped, the transaction is missing there too, and cutover waits for their re-sync."""
    on_both(env, INDIRECT_SCHEMA)
    env.source.psql("CREATE TABLE only_src (id int PRIMARY KEY)", dbname=env.dbname)
    snapshot = env.snapshot()
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        for i, write in enumerate(
            (
                "delete from parent where id = 1",
                "update audited set n = n + 1",
                "update plain set n = next_no() where id = 1",
                "update plain set n = n + 1 where id = 1",
            ),
            start=1,
        ):
            with conn.transaction():
                conn.execute(write)
                conn.execute("insert into only_src values (%s)", (i,))  # the target has no such table
    env.drain()
    journal = ApplyJournal()
    status, _ = replay(env, snapshot, batch_size=10, on_apply_error="skip_and_resync", journal=journal)
    assert status.paused is None and status.skipped_on_error == 4
    cascaded, triggered, called, plain = sorted(journal.errors("app"), key=lambda e: e.position)
    assert set(cascaded.resync_tables) == {"parent", "only_src", "public.child", "public.grandchild"}
    assert set(triggered.resync_tables) == {"audited", "only_src", "*"}  # audit_log, but a trigger may write any
    assert set(called.resync_tables) == {"plain", "only_src", "*"}  # next_no() wrote counters
    assert set(plain.resync_tables) == {"plain", "only_src"}  # nothing beyond what it names
    assert {"public.child", "public.grandchild", "*"} <= set(journal.required_resyncs("app"))
    # What the flags stand for really differs: the source cascaded, the target never saw the DELETE.
    assert env.source.psql("SELECT count(*) FROM child", dbname=env.dbname) == "1"
    assert env.target.psql("SELECT count(*) FROM child", dbname=env.dbname) == "2"
    assert env.source.psql("SELECT n FROM counters", dbname=env.dbname) == "1"
    assert env.target.psql("SELECT n FROM counters", dbname=env.dbname) == "0"


def test_a_target_in_trouble_pauses_replay_even_under_skip_and_resync(env: Env) -> None:
    """A full disk on the target would fail every later transaction too: replay pauses instead of skipping."""
    snapshot = env.snapshot()
    env.target.psql(
        "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; END $$; "
        "CREATE TRIGGER disk_full BEFORE INSERT ON items FOR EACH ROW EXECUTE PROCEDURE disk_full()",
        dbname=env.dbname,
    )
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("insert into items (id, worker, qty) values (1, 0, 1)")
        conn.execute("insert into items (id, worker, qty) values (2, 0, 2)")
    env.drain()
    journal = ApplyJournal()
    status, _ = replay(env, snapshot, batch_size=10, on_apply_error="skip_and_resync", journal=journal)
    assert status.paused is not None and status.skipped_on_error == 0 and status.applied_position == 0
    (error,) = journal.errors("app")
    assert (error.action, error.sqlstate, error.position) == ("paused", "53100", 1)
    assert error.resync_tables == ()  # nothing skipped, so nothing to re-sync for it
    # Flagged when planned, before the target answered (a flag must not be lost to a crash after a commit):
    # for the trigger standing in for the full disk, which fires on the target.
    assert journal.resync_tables("app") == ["items"]


def test_a_replayed_set_local_role_does_not_take_pgleaps_own_write_with_it(env: Env) -> None:
    """SET LOCAL ROLE holds to the end of the replayed transaction; the applied position is still stored."""
    role = f"writer_{env.dbname}"
    for server in (env.source, env.target):
        server.psql(f"CREATE ROLE {role}")
        server.psql(f"GRANT SELECT, UPDATE ON counter TO {role}; GRANT INSERT ON items TO {role}", dbname=env.dbname)
    try:
        snapshot = env.snapshot()
        with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
            with conn.transaction():
                conn.execute(f"set local role {role}")
                conn.execute("update counter set n = n + 1 where id = 1")
                conn.execute("insert into items (id, worker, qty) values (7, 0, 7)")
            conn.execute("insert into items (id, worker, qty) values (8, 0, 8)")  # the next one, as pgleap's role
        env.drain()
        status, _ = replay(env, snapshot, batch_size=10)
        assert status.paused is None and status.applied == 2 and status.applied_position == 2
        stored = env.target.psql("SELECT position FROM pgleap.applied WHERE database = 'app'", dbname=env.dbname)
        assert stored == "2"
        assert_equal(env)
    finally:
        for server in (env.source, env.target):
            server.psql(f"DROP OWNED BY {role}", dbname=env.dbname)
            server.psql(f"DROP ROLE {role}")


def test_a_setting_changed_between_two_writes_of_a_transaction_holds_for_the_writes_after_it(env: Env) -> None:
    """search_path and TimeZone SET (LOCAL or not, RESET too) after a write: each later write replays under the
    value it ran under on the source, in both protocols, in strings of several statements and across savepoints."""
    tables = "".join(
        f"CREATE TABLE {schema}.t (id int PRIMARY KEY, note text, at timestamptz); "
        f"INSERT INTO {schema}.t SELECT g, NULL, NULL FROM generate_series(1, 30) g; "
        for schema in ("s1", "s2")
    )
    for server in (env.source, env.target):
        server.psql(f"CREATE SCHEMA s1; CREATE SCHEMA s2; {tables}", dbname=env.dbname)
    snapshot = env.snapshot()

    def touch(row: int) -> str:
        # An UPDATE replays as a statement (an INSERT would carry row images, named by schema).
        return f"update t set note = current_schema, at = '2020-01-01 12:00' where id = {row}"

    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:  # the extended protocol
        conn.execute("set search_path = s1")
        with conn.transaction():
            conn.execute(touch(1))
            conn.execute("set search_path = s2")
            conn.execute(touch(2))
            conn.execute("set time zone 'Asia/Tokyo'")
            conn.execute(touch(3))
            with pytest.raises(ZeroDivisionError), conn.transaction():
                conn.execute("set search_path = s1")
                conn.execute(touch(4))  # undone with the savepoint, and the SET with it
                raise ZeroDivisionError
            conn.execute(touch(5))
            conn.execute("reset time zone")
            conn.execute("set local search_path = s1")
            conn.execute(touch(6))
        with conn.pipeline(), conn.transaction():
            conn.execute(touch(7))
            conn.execute("set search_path = s1")
            conn.execute(touch(8))
    # The simple protocol, through psql: each -c is one Query message.
    commands = [
        "set search_path = s1",
        f"{touch(10)}; set search_path = s2; {touch(11)}",  # one implicit transaction
        f"begin; {touch(12)}; set local search_path = s1; {touch(13)}; set time zone 'America/Lima'; {touch(14)}; "
        "commit",
        "begin",
        touch(15),
        "set search_path = s1",
        touch(16),
        "set time zone 'Asia/Kolkata'",
        f"{touch(17)}; set search_path = s2; {touch(18)}",
        "commit",
        touch(19),
    ]
    argv = [tool("psql"), env.proxy.dsn(), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    env.drain()
    touched = env.source.psql(
        "SELECT string_agg(note || ':' || id || ':' || extract(epoch FROM at), ' ' ORDER BY note, id) "
        "FROM (SELECT * FROM s1.t UNION ALL SELECT * FROM s2.t) u WHERE note IS NOT NULL",
        dbname=env.dbname,
    )
    # Where each write went on the source, and in which time zone its literal was read.
    base = int(float(env.source.psql("SELECT extract(epoch FROM timestamptz '2020-01-01 12:00')")))
    tokyo, lima, kolkata = 1577847600, 1577898000, 1577860200
    expected = {
        "s1": {1: base, 6: base, 8: base, 10: base, 13: base, 14: lima, 16: lima, 17: kolkata},
        "s2": {2: base, 3: tokyo, 5: tokyo, 7: base, 11: base, 12: base, 15: lima, 18: kolkata, 19: kolkata},
    }
    assert touched.split() == [f"{schema}:{row}:{at}" for schema, rows in expected.items() for row, at in rows.items()]
    status, _ = replay(env, snapshot, batch_size=3)
    assert status.paused is None and status.divergences == 0
    assert_equal(env)


def test_a_setting_changed_in_a_string_that_recovers_a_failed_block_holds_for_the_writes_after_it(env: Env) -> None:
    """`ROLLBACK TO SAVEPOINT a; UPDATE ...; SET search_path = s2; UPDATE ...` sent in a failed block (or
    `COMMIT; BEGIN; ...`): the settings probes, and the txid probe, go after the ROLLBACK TO or COMMIT (before,
    they would fail)."""
    for server in (env.source, env.target):
        server.psql(
            "CREATE SCHEMA s1; CREATE SCHEMA s2; "
            + "".join(
                f"CREATE TABLE {s}.t (id int PRIMARY KEY, note text); INSERT INTO {s}.t SELECT generate_series(1, 5); "
                for s in ("s1", "s2")
            ),
            dbname=env.dbname,
        )
    snapshot = env.snapshot()
    touch = "update t set note = current_schema where id = {}"
    commands = [
        "set search_path = s1",
        "begin",
        touch.format(1),
        "savepoint a",
        "select 1/0",  # the block fails
        f"rollback to savepoint a; {touch.format(2)}; set search_path = s2; {touch.format(3)}",
        "commit",
        "set search_path = s1",
        "begin",
        "select 1/0",
        # The COMMIT of a failed block rolls it back, and the string goes on.
        f"commit; begin; {touch.format(4)}; set search_path = s2; {touch.format(5)}; commit",
        "set search_path = s1",
        "begin",
        "select 1/0",
        f"rollback; begin; {touch.format(1)}; commit",  # the same row again: only its record is new
    ]
    argv = [tool("psql"), env.proxy.dsn(), "-X", "-q", "-v", "ON_ERROR_STOP=0"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "division by zero" in done.stderr, done.stderr
    env.drain()
    query = (
        "SELECT string_agg(note || ':' || id, ' ' ORDER BY note, id) "
        "FROM (SELECT * FROM s1.t UNION ALL SELECT * FROM s2.t) u"
    )
    assert env.source.psql(query, dbname=env.dbname) == "s1:1 s1:2 s1:4 s2:3 s2:5"
    # The txid probe too runs once the failed block is over: each record can be placed by the copy's snapshot.
    records = env.changelog.read_committed("app", 0, 10)
    assert len(records) == 3 and all(r.transaction.txid is not None for r in records)
    status, _ = replay(env, snapshot)
    assert status.paused is None and status.divergences == 0
    assert env.target.psql(query, dbname=env.dbname) == "s1:1 s1:2 s1:4 s2:3 s2:5"


def test_set_constraints_deferred_is_replayed_with_its_transaction(env: Env) -> None:
    """A child row inserted before its parent under SET CONSTRAINTS ALL DEFERRED replays as on the source."""
    schema = (
        "CREATE TABLE parent (id int PRIMARY KEY); "
        "CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent DEFERRABLE INITIALLY IMMEDIATE)"
    )
    for server in (env.source, env.target):
        server.psql(schema, dbname=env.dbname)
    snapshot = env.snapshot()
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        with conn.transaction():
            conn.execute("set constraints all deferred")
            conn.execute("insert into child values (1, 10)")
            conn.execute("insert into parent values (10)")
        conn.execute("insert into parent values (20)")  # the next transaction: checked at once again
    env.drain()
    status, _ = replay(env, snapshot, batch_size=10)
    assert status.paused is None and status.applied == 2 and status.applied_position == 2
    assert env.target.psql("SELECT parent_id FROM child", dbname=env.dbname) == "10"
    assert_equal(env)


def test_a_record_without_a_txid_captured_while_the_copy_ran_flags_its_tables(env: Env) -> None:
    """Such a record may be in the copy already: it is applied (never lost) and its tables are re-synced."""
    from pgleap.store import CapturedStatement, CapturedTransaction

    snapshot = env.snapshot()

    async def log(at: float) -> None:
        statement = CapturedStatement("update counter set n = n + 1 where id = 1", tag="UPDATE 1")
        tx = CapturedTransaction("app", None, None, (), (statement,), session_id=1, captured_at=at)
        await env.changelog.settle(await env.changelog.prepare(tx), committed=True, wait=True)

    asyncio.run(log(time.time()))
    journal = ApplyJournal()
    status, _ = replay(env, snapshot, journal=journal, copied_until=time.time() + 60)
    assert status.applied == 1 and status.paused is None
    assert journal.resync_tables("app") == ["counter"]
    # Captured after the copy finished: after S, nothing to doubt.
    asyncio.run(log(time.time()))
    later = ApplyJournal()
    status, _ = replay(env, snapshot, journal=later, copied_until=time.time() - 60)
    assert status.applied == 1 and later.resync_tables("app") == []
    assert env.counter(env.target) == 2


def test_replay_trims_the_applied_records_behind_it(env: Env) -> None:
    """The change log keeps `retain` applied transactions behind replay and deletes the rest, a chunk at a time."""
    snapshot = env.snapshot()
    committed = run_workers(env.proxy.dsn(), workers=2, count=30)
    env.drain()

    async def go() -> ReplayStatus:
        replayer = Replayer(env.upgrade, env.changelog, snapshot, batch_size=10, retain=5, max_retries=5)
        assert replayer.retention is not None
        replayer.retention.interval, replayer.retention.chunk, replayer.retention.keep_seconds = 0.0, 4, 0.0
        try:
            status = await replayer.run_until_caught_up()
            for _ in range(committed):  # the rest, chunk by chunk
                await replayer.retention.trim(replayer.position)
            return status
        finally:
            replayer.close()

    status = asyncio.run(go())
    assert status.applied_position == committed
    kept = [r.position for r in env.changelog.read_committed("app", 0, 10_000)]
    assert kept == list(range(committed - 4, committed + 1))  # the 5 applied last
    assert env.changelog.stats().committed == 5
    assert_equal(env)


def test_a_target_copied_again_after_trimming_starts_past_the_deleted_records_its_snapshot_holds(env: Env) -> None:
    """After ROLLBACK UPGRADE and a new copy the target is at position 0 while the log's head is gone."""
    first_s = env.snapshot()
    first = run_workers(env.proxy.dsn(), workers=2, count=12)
    env.drain()

    async def apply_and_trim() -> None:
        replayer = Replayer(env.upgrade, env.changelog, first_s, retain=1, max_retries=5)
        assert replayer.retention is not None
        replayer.retention.interval, replayer.retention.keep_seconds = 0.0, 0.0
        try:
            await replayer.run_until_caught_up()
            await replayer.retention.trim(replayer.position)
        finally:
            replayer.close()

    asyncio.run(apply_and_trim())
    assert env.changelog.trimmed("app").through == first - 1  # all but the last applied one
    # A new copy at a later S: the data as the source has it now, and no applied position yet.
    second_s = env.snapshot()
    env.target.psql("DROP SCHEMA pgleap CASCADE", dbname=env.dbname)
    second = 5
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        for i in range(second):
            with conn.transaction():
                conn.execute("insert into items (id, worker, qty) values (%s, 9, %s)", (900_000 + i, i))
                conn.execute("update counter set n = n + 1 where id = 1")
    env.drain()

    with pytest.raises(ReplayError, match="does not hold them all"):
        replay(env, first_s)  # S of the first copy: the deleted records are not all in it
    assert env.counter(env.target) == first  # nothing applied on the way
    status, _ = replay(env, second_s)
    assert status.paused is None and status.applied_position == first + second
    assert status.applied == second and status.skipped_in_snapshot == 1  # the one kept, in the copy already
    assert env.counter(env.target) == env.counter(env.source) == first + second
    assert_equal(env)


def test_statements_that_refuse_a_transaction_block_replay_on_their_own(env: Env) -> None:
    """CREATE INDEX CONCURRENTLY (and the like) runs on the target outside any transaction, between batches."""
    snapshot = env.snapshot()
    write_through_proxy(
        env,
        "insert into items (id, worker, qty) values (1, 0, 1)",
        "create index concurrently items_qty on items (qty)",
        "insert into items (id, worker, qty) values (2, 0, 2)",
    )
    status, _ = replay(env, snapshot, batch_size=10)
    assert status.paused is None and status.applied_position == 3 and status.applied == 3
    assert status.divergences == 0
    valid = env.target.psql(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_qty'::regclass", dbname=env.dbname
    )
    assert valid == "t"
    assert_equal(env)


def test_a_refused_statement_outside_a_block_pauses_and_can_be_skipped(env: Env) -> None:
    """Run again after a crash (or made on the target by hand), such a statement pauses replay like any refusal."""
    snapshot = env.snapshot()
    env.target.psql("create index items_qty on items (qty)", dbname=env.dbname)
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("create index concurrently items_qty on items (qty)")
        conn.execute("insert into items (id, worker, qty) values (1, 0, 1)")
    env.drain()

    async def go() -> tuple[ReplayStatus, ReplayStatus]:
        replayer = Replayer(env.upgrade, env.changelog, snapshot, batch_size=10, max_retries=5)
        try:
            paused = await replayer.run_until_caught_up()
            replayer.resume(skip=True)
            return paused, await replayer.run_until_caught_up()
        finally:
            replayer.close()

    paused, resumed = asyncio.run(go())
    assert paused.paused is not None and paused.paused.sqlstate == "42P07" and paused.applied_position == 0
    assert resumed.paused is None and resumed.applied_position == 2 and resumed.skipped_on_error == 1
    assert env.target.psql("select count(*) from items", dbname=env.dbname) == "1"


def test_resume_with_skip_survives_a_connection_lost_while_paused(env: Env) -> None:
    """Replay stays connected while paused, for hours maybe: a connection lost meanwhile keeps the DBA's skip."""
    snapshot = env.snapshot()
    _error_workload(env)

    async def go() -> tuple[ReplayStatus, ReplayStatus]:
        replayer = Replayer(
            env.upgrade, env.changelog, snapshot, batch_size=10, backoff_initial=0.01, backoff_max=0.05, max_retries=5
        )
        try:
            paused = await replayer.run_until_caught_up()
            assert replayer._session is not None
            env.target.psql(f"SELECT pg_terminate_backend({replayer._session.pid})")
            replayer.resume(skip=True)
            return paused, await replayer.run_until_caught_up()
        finally:
            replayer.close()

    paused, resumed = asyncio.run(go())
    assert paused.paused is not None and paused.paused.position == 2
    assert resumed.paused is None and resumed.skipped_on_error == 1 and resumed.applied_position == 4


def test_tables_whose_triggers_fire_again_on_the_target_are_flagged_for_resync(env: Env) -> None:
    """A trigger recomputes on the target what the image carried: nothing in the tags shows it, so it is flagged."""
    stamp = (
        "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN NEW.payload := jsonb_build_object('at', clock_timestamp()); RETURN NEW; END $$;"
        "CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON events FOR EACH ROW EXECUTE PROCEDURE stamp()"
    )
    for server in (env.source, env.target):
        server.psql(stamp, dbname=env.dbname)
    snapshot = env.snapshot()
    write_through_proxy(
        env, "insert into events (id) values (1)", "insert into items (id, worker, qty) values (1, 0, 1)"
    )
    journal = ApplyJournal()
    status, _ = replay(env, snapshot, journal=journal)
    assert status.applied == 2 and status.divergences == 0  # the tags agree
    assert journal.resync_tables("app") == ["events"]  # items has no trigger
    payload = "SELECT payload FROM events WHERE id = 1"
    assert env.source.psql(payload, dbname=env.dbname) != env.target.psql(payload, dbname=env.dbname)


def test_statements_the_target_may_compute_otherwise_flag_their_tables(env: Env) -> None:
    """random() in an UPDATE replays to another value with the same tag: its table is flagged, others not."""
    snapshot = env.snapshot()
    write_through_proxy(
        env,
        "insert into items (id, worker, qty) values (1, 0, 1)",
        "update items set qty = 1 + (random() * 1000000)::int where id = 1",
        "update counter set n = n + 1 where id = 1",
    )
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("insert into events (id) values (1)")
        conn.execute("update events set payload = to_jsonb(%s::timestamptz) where id = 1", ("now",))  # a parameter
    journal = ApplyJournal()
    status, _ = replay(env, snapshot, journal=journal)
    assert status.applied == 5 and status.divergences == 0
    assert journal.resync_tables("app") == ["events", "items"]
    assert journal.required_resyncs("app") == []  # they may differ: found and repaired, cutover does not wait


def test_writes_replayed_as_statements_flag_the_tables_whose_defaults_the_target_computes(env: Env) -> None:
    """COPY and an INSERT in a CTE (no row images) have the target compute now() and nextval() again."""
    schema = (
        "CREATE TABLE stamped (id serial PRIMARY KEY, at timestamptz DEFAULT now(), note text); "
        "CREATE TABLE plain (id int PRIMARY KEY, note text DEFAULT 'constant'); "
        "CREATE TABLE imaged (id serial PRIMARY KEY, at timestamptz DEFAULT now()); "
        "CREATE TABLE cte_target (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp()); "
        "CREATE DOMAIN stamp AS timestamptz DEFAULT now(); CREATE TABLE by_domain (id int PRIMARY KEY, at stamp)"
    )
    on_both(env, schema)
    catalog = env.capture.catalog
    assert catalog is not None and env.proxy.call(catalog.load_once())  # made outside pgleap: read them now
    snapshot = env.snapshot()
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        with conn.cursor().copy("copy stamped (note) from stdin") as copy:
            copy.write_row(("copied",))
        with conn.cursor().copy("copy plain (id) from stdin") as copy:
            copy.write_row((1,))
        with conn.cursor().copy("copy by_domain (id) from stdin") as copy:
            copy.write_row((1,))
        conn.execute("insert into imaged default values")  # row images: the source's values, exact
        conn.execute("with w as (insert into cte_target (id) values (1) returning id) select count(*) from w")
    env.drain()
    status, journal = replay_flagging(env, snapshot)
    assert status.applied == 5 and status.paused is None
    assert journal.resync_tables("app") == ["by_domain", "cte_target", "stamped"]


def test_a_write_calling_a_users_volatile_function_flags_its_table(env: Env) -> None:
    """The target runs the function again (its own counters, its own random()); an immutable one is exact."""
    schema = (
        "CREATE TABLE vf_a (id int PRIMARY KEY, n int); CREATE TABLE vf_b (id int PRIMARY KEY, n int); "
        "INSERT INTO vf_a VALUES (1, 1); INSERT INTO vf_b VALUES (1, 1); "
        "CREATE FUNCTION pick() RETURNS int VOLATILE LANGUAGE sql AS 'SELECT (random() * 1000000)::int'; "
        "CREATE FUNCTION twice(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1 * 2'"
    )
    on_both(env, schema)
    snapshot = env.snapshot()
    write_through_proxy(env, "update vf_a set n = pick() where id = 1", "update vf_b set n = twice(n) where id = 1")
    status, journal = replay_flagging(env, snapshot)
    assert status.applied == 2 and status.paused is None
    assert journal.resync_tables("app") == ["vf_a"]


def test_a_write_reading_a_table_flags_its_table(env: Env) -> None:
    """READ COMMITTED: each UPDATE read a table before another session's INSERT there committed, and committed
    after it. Replay in commit order runs the INSERT first, so the target reads one more, with the same tag."""
    on_both(
        env,
        "CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE stats (id int PRIMARY KEY, total int); "
        "INSERT INTO stats VALUES (1, 0); CREATE TABLE own (id int PRIMARY KEY, n int); INSERT INTO own VALUES (1, 0); "
        "CREATE TABLE plain (id int PRIMARY KEY, n int); INSERT INTO plain VALUES (1, 0)",
    )
    snapshot = env.snapshot()
    with psycopg.connect(env.proxy.dsn()) as counting, psycopg.connect(env.proxy.dsn(), autocommit=True) as other:
        counting.execute("UPDATE stats SET total = (SELECT count(*) FROM orders) WHERE id = 1")
        counting.execute("UPDATE own SET n = (SELECT max(id) FROM own) WHERE id = 1")  # its own table, read
        counting.execute("UPDATE plain SET n = n + 1 WHERE id = 1")  # only the rows it writes, locked
        other.execute("INSERT INTO orders VALUES (1)")
        other.execute("INSERT INTO own VALUES (2, 0)")
        counting.commit()
    env.drain()
    status, journal = replay_flagging(env, snapshot)
    assert status.applied == 3 and status.divergences == 0 and status.paused is None
    query = "SELECT (SELECT total FROM stats), (SELECT n FROM own WHERE id = 1), (SELECT n FROM plain)"
    source, target = (server.psql(query, dbname=env.dbname) for server in (env.source, env.target))
    assert (source, target) == ("0|1|1", "1|2|1")
    assert journal.resync_tables("app") == ["own", "stats"]  # found by their re-sync, not left to a round


def test_replay_refuses_a_target_database_created_again_under_it(env: Env) -> None:
    """A second copy drops and recreates the target at a new S: a replayer from the old S stops and writes nothing."""
    snapshot = env.snapshot()
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("insert into items (id, worker, qty) values (1, 0, 1)")
    env.drain()

    async def go() -> int:
        replayer = Replayer(env.upgrade, env.changelog, snapshot, max_retries=5)
        try:
            first = await replayer.run_until_caught_up()
            assert first.applied_position == 1 and replayer.target_oid is not None
            replayer.close()
            # What a new copy does: the database dropped, created again, filled at a later S (the row included).
            env.target.psql(f"DROP DATABASE {env.dbname} WITH (FORCE)")
            env.target.psql(f"CREATE DATABASE {env.dbname}")
            env.target.psql(SCHEMA + "INSERT INTO items (id, worker, qty) VALUES (1, 0, 1)", dbname=env.dbname)
            with pytest.raises(ReplayError, match="dropped and created again"):
                await replayer.run_until_caught_up()
            return replayer.target_oid
        finally:
            replayer.close()

    old_oid = asyncio.run(go())
    new_oid = int(env.target.psql(f"SELECT oid FROM pg_database WHERE datname = '{env.dbname}'"))
    assert new_oid != old_oid
    # Nothing was written: not pgleap's position table, not the logged insert again.
    assert env.target.psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgleap'", dbname=env.dbname) == "0"
    assert env.target.psql("SELECT count(*) FROM items", dbname=env.dbname) == "1"

    async def fresh(oid: int) -> ReplayStatus:
        replayer = Replayer(env.upgrade, env.changelog, env.snapshot(), target_oid=oid, max_retries=5)
        try:
            return await replayer.run_until_caught_up()
        finally:
            replayer.close()

    with pytest.raises(ReplayError, match=f"its oid is {new_oid}, not {old_oid}"):
        asyncio.run(fresh(old_oid))  # started from a copy run that recorded the old database
    status = asyncio.run(fresh(new_oid))  # the new copy's S holds the insert: skipped, not applied again
    assert (status.applied_position, status.applied, status.skipped_in_snapshot) == (1, 0, 1)
    assert env.target.psql("SELECT count(*) FROM items", dbname=env.dbname) == "1"


def test_two_replayers_at_once_still_apply_each_transaction_once(env: Env) -> None:
    """The position guard makes a second replayer (two pgleap instances, or a stale connection) harmless."""
    snapshot = env.snapshot()
    committed = run_workers(env.proxy.dsn(), workers=2, count=60)
    env.drain()

    async def go() -> list[ReplayStatus]:
        replayers = [
            Replayer(
                env.upgrade,
                env.changelog,
                snapshot,
                batch_size=2,
                backoff_initial=0.001,
                backoff_max=0.01,
                max_retries=1000,
            )
            for _ in range(2)
        ]
        try:
            return list(await asyncio.gather(*(r.run_until_caught_up() for r in replayers)))
        finally:
            for r in replayers:
                r.close()

    statuses = asyncio.run(go())
    assert all(s.applied_position == committed for s in statuses)
    assert env.counter(env.target) == env.counter(env.source) == committed
    assert_equal(env)


def _insert_events(dsn: str, first: int, *, count: int | None = None, seconds: float | None = None) -> int:
    """One event row per autocommit transaction, `count` of them or for `seconds`; how many were written."""
    written = 0
    deadline = time.monotonic() + (seconds or 0.0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while (count is not None and written < count) or (seconds is not None and time.monotonic() < deadline):
            conn.execute("insert into events (id) values (%s)", (first + written,))
            written += 1
    return written


def _target_batches(env: Env, first: int, last: int) -> tuple[int, int]:
    """(rows, target transactions that wrote them) of events first..last: each replay batch is one transaction."""
    out = env.target.psql(
        f"SELECT count(*), count(DISTINCT xmin::text) FROM events WHERE id BETWEEN {first} AND {last}",
        dbname=env.dbname,
    )
    rows, batches = out.split("|")
    return int(rows), int(batches)


def test_replay_batches_once_per_poll_interval_while_it_keeps_up_and_at_once_behind(env: Env) -> None:
    """Keeping up, one batch per poll interval (not one per handful of records); a backlog goes in full batches."""
    snapshot = env.snapshot()
    # A backlog of four full batches, then a 5 s poll interval: paced, it would take 15 s; it must go at once.
    assert _insert_events(env.proxy.dsn(), 1, count=200) == 200
    env.drain()

    async def follow(poll_interval: float, batch_size: int, until: Callable[[], bool], timeout: float) -> float:
        replayer = Replayer(env.upgrade, env.changelog, snapshot, poll_interval=poll_interval, batch_size=batch_size)
        stop = asyncio.Event()
        task = asyncio.create_task(replayer.run(stop))
        started = time.monotonic()
        try:
            while not until():
                assert time.monotonic() - started < timeout, f"replay did not get there in {timeout} s"
                assert not task.done(), task.result()
                await asyncio.sleep(0.05)
            return time.monotonic() - started
        finally:
            stop.set()
            await task
            replayer.close()

    asyncio.run(follow(5.0, 50, lambda: _target_batches(env, 1, 200)[0] == 200, timeout=10.0))
    assert _target_batches(env, 1, 200) == (200, 4), "the backlog was not applied in full batches"
    # Keeping up with steady writers: at most one batch per poll interval, each holding many transactions.
    written: list[int] = []
    writers = [
        threading.Thread(target=lambda w=w: written.append(_insert_events(env.proxy.dsn(), w * 100_000, seconds=3.0)))
        for w in range(1, 5)
    ]
    for writer in writers:
        writer.start()

    def applied_all() -> bool:
        if any(writer.is_alive() for writer in writers):
            return False
        env.drain()
        return _target_batches(env, 100_000, 500_000)[0] == sum(written)

    elapsed = asyncio.run(follow(0.5, 100_000, applied_all, timeout=60.0))
    rows, batches = _target_batches(env, 100_000, 500_000)
    assert rows == sum(written) >= 100, f"the writers managed only {sum(written)} transactions in 3 s"
    assert batches <= elapsed / 0.5 + 2, f"{batches} batches in {elapsed:.2f} s at a 0.5 s poll interval"
    assert_equal(env)
