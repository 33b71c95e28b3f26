"""Row images (I3): serial keys, volatile defaults and upserts replay to identical rows, with no re-sync.

A PG 10 source behind a capturing proxy takes concurrent writes whose values the target could not
compute again by running the statements: sequences advancing under concurrency and rollbacks,
`DEFAULT now()` and `clock_timestamp()`, `random()`, identity columns, `ON CONFLICT DO UPDATE`. The
log is replayed on PG 18 and every table must equal the source row by row. The client must not notice:
its own RETURNING rows and psql's output are what it gets straight from the server.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.store.records import decode_image
from pgleap.upgrade.capture.catalog import SourceCatalog
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.replay import Replayer

from conftest import CapturingPair, capturing_pair, tool

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE orders (id serial PRIMARY KEY, worker int NOT NULL, created timestamptz NOT NULL DEFAULT now(),
                     amount float8 DEFAULT random(), ratio float4, note text, tags int[], doc jsonb, raw bytea);
CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text,
                    at timestamp DEFAULT clock_timestamp());
CREATE TABLE keyless (worker int, v float8 DEFAULT random(), at timestamptz DEFAULT now());
CREATE TABLE upserts (k text PRIMARY KEY, n int NOT NULL, touched timestamptz NOT NULL DEFAULT now());
CREATE TABLE guarded (id serial PRIMARY KEY, v text);
CREATE RULE guarded_log AS ON INSERT TO guarded DO ALSO NOTIFY guarded;
"""


@pytest.fixture
def env(tmp_path: Path, pg_old: LabServer, target18: LabServer) -> Iterator[CapturingPair]:
    """SCHEMA on a fresh PG 10 database behind a capturing proxy, and on PG 18."""
    yield from capturing_pair(tmp_path, pg_old, target18, SCHEMA, "ri", CapturingPair)


def replay_and_compare(env: CapturingPair, snapshot: str) -> list[str]:
    """Drain capture, replay the whole log on the target from `snapshot`, and compare every table."""
    env.drain()

    async def go() -> list[str]:
        replayer = Replayer(env.upgrade, env.changelog, snapshot, max_retries=5)
        try:
            status = await replayer.run_until_caught_up()
        finally:
            replayer.close()
        assert status.paused is None, f"replay paused: {status.paused}"
        assert status.divergences == 0, "a replayed statement's row count differed from the source's"
        return await database_differences(env.upgrade.source, env.upgrade.target)

    return asyncio.run(go())


def psycopg_worker(dsn: str, worker: int, rounds: int, returned: list[tuple[int, int]]) -> None:
    """Simple and extended protocol, autocommit and explicit, savepoints and rollbacks, RETURNING."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(rounds):
            conn.execute(f"INSERT INTO orders (worker, note) VALUES ({worker}, 'simple {i}')", prepare=False)
            row = conn.execute(
                "INSERT INTO orders (worker, ratio, tags, doc, raw) VALUES (%s, %s, %s, %s, %s) RETURNING id, worker",
                (
                    worker,
                    1 / (i + 3),
                    [i, worker],
                    psycopg.types.json.Jsonb({"i": i, "w": [worker]}),
                    bytes([i % 256, 0]),
                ),
            ).fetchone()
            assert row is not None and row[1] == worker
            returned.append((row[0], worker))
            with conn.transaction():
                conn.execute("INSERT INTO ident (v) VALUES (%s)", (f"w{worker}-{i}",))
                try:
                    with conn.transaction():  # a savepoint whose sequence values are consumed, then rolled back
                        conn.execute("INSERT INTO orders (worker, note) VALUES (%s, 'undone')", (worker,))
                        conn.execute("INSERT INTO orders (id, worker) VALUES (1, 0)")  # duplicate key: fails
                except psycopg.errors.UniqueViolation:
                    pass
                conn.execute("INSERT INTO keyless (worker) SELECT %s FROM generate_series(1, 3)", (worker,))
            conn.execute(
                "INSERT INTO upserts AS u (k, n) VALUES (%s, 1) "
                "ON CONFLICT (k) DO UPDATE SET n = u.n + 1, touched = now()",
                (f"k{i % 5}",),
            )
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO orders (worker, note) VALUES (%s, 'rolled back')", (worker,))
                    raise _Rollback
            except _Rollback:
                pass


class _Rollback(Exception):
    pass


async def asyncpg_worker(port: int, worker: int, rounds: int, returned: list[tuple[int, int]]) -> None:
    """asyncpg: prepared statements, binary results for the client's own RETURNING columns."""
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="app", password="app-secret", database="app", statement_cache_size=100
    )
    try:
        for i in range(rounds):
            new_id = await conn.fetchval(
                "INSERT INTO orders (worker, amount) VALUES ($1, $2) RETURNING id", worker, i * 0.1
            )
            returned.append((new_id, worker))
            await conn.execute("INSERT INTO ident (v) VALUES ($1)", f"a{worker}-{i}")
            async with conn.transaction():
                row = await conn.fetchrow("INSERT INTO orders (worker) VALUES ($1) RETURNING *", worker)
                assert row is not None and row["worker"] == worker and row["created"] is not None
                returned.append((row["id"], worker))
    finally:
        await conn.close()


def test_concurrent_volatile_inserts_replay_identically(env: CapturingPair) -> None:
    """Serial keys, defaults and upserts from four concurrent clients replay to equal tables (no re-sync)."""
    snapshot = env.source.psql("SELECT txid_current_snapshot()", dbname=env.dbname)
    returned: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def run(target: object, *args: object) -> None:
        try:
            if asyncio.iscoroutinefunction(target):
                asyncio.run(target(*args))
            else:
                target(*args)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(psycopg_worker, env.proxy.dsn(), w, 25, returned)) for w in (1, 2, 3)]
    threads.append(threading.Thread(target=run, args=(asyncpg_worker, env.proxy.port, 4, 25, returned)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # The client got the ids the source assigned, with its own columns only.
    on_source = dict(
        tuple(map(int, line.split("|")))
        for line in env.source.psql("SELECT id, worker FROM orders", dbname=env.dbname).split()
    )
    assert all(on_source[i] == w for i, w in returned)
    images = [s for r in env.changelog.read_committed("app", 0, 100_000) for s in r.transaction.statements if s.images]
    assert len(images) > 300, "INSERTs were replayed as statements instead of row images"
    assert {decode_image(s.images).table for s in images if s.images} >= {"orders", "ident", "keyless", "upserts"}
    assert env.capture.inserts_without_image == 0
    assert replay_and_compare(env, snapshot) == []


def test_a_table_with_rules_is_replayed_as_statements(env: CapturingPair) -> None:
    """A rule forbids RETURNING: capture leaves the statement alone, the client sees no error."""
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO guarded (v) VALUES ('x')")
    env.drain()
    statements = [s for r in env.changelog.read_committed("app", 0, 100) for s in r.transaction.statements]
    assert [s.images for s in statements] == [None]
    assert env.capture.inserts_without_image == 1


def timed_insert(env: CapturingPair, worker: int) -> tuple[float, list[bool]]:
    """One autocommit INSERT through the proxy: seconds until answered, and whether each logged statement
    carries row images."""
    started = time.monotonic()
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO orders (worker) VALUES (%s)", (worker,))
    held = time.monotonic() - started
    env.drain()
    statements = [s for r in env.changelog.read_committed("app", 0, 100) for s in r.transaction.statements]
    return held, [s.images is not None for s in statements]


class _SlowCatalog(SourceCatalog):
    """A source catalog whose loads take a second longer, as a busy source's would."""

    async def load_once(self) -> bool:
        await asyncio.sleep(1.0)
        return await super().load_once()


def test_an_insert_waits_for_the_first_catalog_load(env: CapturingPair) -> None:
    """Capture just started (or resumed after a restart) with its catalog still loading: an INSERT waits for
    the load and carries row images, instead of going to the log as a statement."""

    async def reload_slowly() -> None:
        assert env.proxy.proxy is not None and env.capture.catalog is not None
        database = env.proxy.proxy.databases["app"]
        await env.capture.catalog.stop()
        env.capture.catalog = _SlowCatalog(database.upgrade.database, database.upgrade.source)
        env.capture.catalog.start()

    env.proxy.call(reload_slowly())
    held, with_images = timed_insert(env, 7)
    assert with_images == [True]
    assert env.capture.inserts_without_image == 0
    assert held >= 0.5, f"the INSERT was answered after {held:.2f} s, before the catalog could have loaded"


class _StuckCatalog(SourceCatalog):
    """A source catalog whose first load never finishes in time."""

    async def load_once(self) -> bool:
        await asyncio.sleep(300)
        return False


def test_an_insert_waiting_for_the_catalog_goes_on_when_capture_stops_refreshing_it(env: CapturingPair) -> None:
    """STOP CAPTURE (or cutover) stops the catalog: an INSERT held for it goes on now, not after CATALOG_WAIT."""
    assert env.proxy.proxy is not None
    database = env.proxy.proxy.databases["app"]
    stuck = _StuckCatalog(database.upgrade.database, database.upgrade.source)

    async def swap() -> None:
        assert env.capture.catalog is not None
        await env.capture.catalog.stop()
        env.capture.catalog = stuck
        stuck.start()

    env.proxy.call(swap())
    result: list[tuple[float, list[bool]]] = []
    inserting = threading.Thread(target=lambda: result.append(timed_insert(env, 8)))
    inserting.start()
    time.sleep(1.0)
    assert inserting.is_alive(), "the INSERT did not wait for the first catalog load"
    env.proxy.call(stuck.stop())
    inserting.join(60)
    (held, with_images), = result
    assert held < 10, f"the INSERT waited {held:.1f} s after the catalog stopped refreshing"
    assert with_images == [False]


def test_a_catalog_the_source_refuses_holds_no_insert(env: CapturingPair) -> None:
    """When the source refuses pgleap's catalog login, INSERTs are not held for it: they go to the log as
    statements, and are counted so their tables get verified."""

    async def refused() -> None:
        assert env.proxy.proxy is not None and env.capture.catalog is not None
        database = env.proxy.proxy.databases["app"]
        await env.capture.catalog.stop()
        catalog = SourceCatalog(database.upgrade.database, replace(database.upgrade.source, password="wrong"))
        assert not await catalog.load_once()
        env.capture.catalog = catalog

    env.proxy.call(refused())
    held, with_images = timed_insert(env, 8)
    assert with_images == [False]
    assert env.capture.inserts_without_image == 1
    assert held < 5, f"the INSERT waited {held:.2f} s for a catalog the source refuses"


def test_psql_sees_the_same_bytes_as_directly(env: CapturingPair) -> None:
    """psql output of INSERTs, with and without RETURNING, is identical through the capturing proxy."""
    script = (
        "INSERT INTO orders (id, worker, created, amount) VALUES (100000, 7, '2020-01-01', 0.5);\n"
        "INSERT INTO orders (id, worker, created, amount) VALUES (100001, 7, '2020-01-01', 0.5) RETURNING id, worker;\n"
        "INSERT INTO orders (id, worker, created, amount) VALUES (100002, 7, '2020-01-01', 0.5) RETURNING *;\n"
        "BEGIN; INSERT INTO orders (id, worker, created) VALUES (100003, 7, '2020-01-01')\n"
        "  RETURNING amount IS NULL; COMMIT;\n"
    )
    direct_script = script.replace("1000", "2000")

    def psql(dsn: str, text: str) -> str:
        env_vars = {"PATH": "/usr/bin:/bin"}
        done = subprocess.run(
            [tool("psql"), "-X", "-d", dsn],
            input=text,
            capture_output=True,
            text=True,
            env=env_vars,
            timeout=60,
            check=True,
        )
        return done.stdout

    through = psql(env.proxy.dsn(), script)
    direct = psql(env.source.dsn(env.dbname), direct_script)
    assert through.replace("1000", "2000") == direct
    env.drain()
    assert (
        sum(1 for r in env.changelog.read_committed("app", 0, 100) for s in r.transaction.statements if s.images) == 4
    )
