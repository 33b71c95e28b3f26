"""Real clients through pgleap against an old (PG 10, md5) and a new (PG 18, SCRAM) server."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.testing import ProxyThread

from conftest import run_tool, tool

pytestmark = pytest.mark.integration


def test_psql_multi_statement_and_errors(proxy: ProxyThread, backend: LabServer) -> None:
    out = run_tool(
        [
            tool("psql"),
            proxy.dsn(),
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "select 1; select current_setting('server_version_num')::int / 10000; select 'a' || 'b'",
        ]
    ).stdout.split()
    assert out == ["1", str(backend.major), "ab"]


def test_psql_reports_server_errors_verbatim(proxy: ProxyThread) -> None:
    import subprocess

    result = subprocess.run([tool("psql"), proxy.dsn(), "-X", "-c", "select 1/0"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "division by zero" in result.stderr


def test_psycopg_simple_extended_copy_and_types(proxy: ProxyThread, backend: LabServer) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=False) as conn:
        conn.execute("drop table if exists t_psycopg")
        conn.execute("create table t_psycopg(id int primary key, name text, at timestamptz default now(), data bytea)")
        with conn.cursor() as cur:
            cur.executemany(
                "insert into t_psycopg(id, name, data) values (%s, %s, %s)",
                [(i, f"n{i}", bytes([i])) for i in range(50)],
            )
        conn.commit()
        # Server-side prepared statements (psycopg prepares after repeated use) and binary results.
        for _ in range(6):
            row = conn.execute("select count(*), sum(id) from t_psycopg where id >= %s", (10,), prepare=True).fetchone()
            assert row == (40, sum(range(10, 50)))
        with conn.cursor(binary=True) as cur:
            cur.execute("select data from t_psycopg where id = %s", (7,))
            assert cur.fetchone() == (b"\x07",)
        with conn.cursor().copy("copy t_psycopg(id, name) to stdout") as copy:
            rows = list(copy.rows())
        assert len(rows) == 50
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("insert into t_psycopg(id) values (1)")
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.info.server_version // 10000 == backend.major
        # Pipeline mode: several extended-protocol queries before one Sync.
        with conn.pipeline():
            cursors = [conn.execute("select %s::int * 2", (i,)) for i in range(10)]
        assert [c.fetchone()[0] for c in cursors] == [i * 2 for i in range(10)]  # type: ignore[index]
        conn.execute("drop table t_psycopg")
        conn.commit()


def test_asyncpg(proxy: ProxyThread, backend: LabServer) -> None:
    async def scenario() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user="app", password="app-secret", database="app"
        )
        try:
            assert await conn.fetchval("select $1::int + 1", 41) == 42
            await conn.execute(
                "drop table if exists t_asyncpg; create table t_asyncpg(id serial primary key, v numeric, tags text[])"
            )
            await conn.executemany(
                "insert into t_asyncpg(v, tags) values ($1, $2)", [(i / 3, [str(i)]) for i in range(100)]
            )
            async with conn.transaction():
                await conn.execute("update t_asyncpg set v = v + 1 where id <= 10")
            records = await conn.fetch("select id, tags from t_asyncpg order by id limit 3")
            assert [r["tags"] for r in records] == [["0"], ["1"], ["2"]]
            await conn.copy_records_to_table("t_asyncpg", records=[(1000, 1.5, ["x"])], columns=["id", "v", "tags"])
            assert await conn.fetchval("select count(*) from t_asyncpg") == 101
            stmt = await conn.prepare("select count(*) from t_asyncpg where id > $1")
            assert await stmt.fetchval(50) == 51
            with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
                await conn.fetchval("select 1/0")
            assert conn.get_server_version().major == backend.major
            await conn.execute("drop table t_asyncpg")
        finally:
            await conn.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(proxy: ProxyThread, mode: str) -> None:
    dsn = proxy.dsn()
    run_tool([tool("pgbench"), "-i", "-s", "1", "-q", "-I", "dtgp", dsn])
    result = run_tool([tool("pgbench"), "-n", "-c", "4", "-j", "2", "-t", "200", "-M", mode, dsn])
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", result.stdout)
    assert processed and processed.group(1) == processed.group(2) == "800", result.stdout
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is None or failed.group(1) == "0", result.stdout
