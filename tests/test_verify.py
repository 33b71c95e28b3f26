"""Issue 5's first bar: verification under a live workload finds every row changed behind pgleap's back,
reports nothing where nothing differs, re-sync repairs what it found, and the tables end equal.

PG 10 source behind an in-process pgleap (capture and replay over the admin console), PG 18 target. Both
start from the same deterministic data (`pgbench -i` and a generated table with a text key, floats and a
float array), S is taken before any write, so replay alone keeps the target in step. pgbench TPC-B runs
through pgleap for the whole test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.testing import ProxyThread
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.verify.service import TableReport

from conftest import console, quiesce, record_copy_snapshot, show, start_proxy, tool, wait_for

pytestmark = pytest.mark.integration

ITEMS = """
CREATE TABLE items (code text PRIMARY KEY, price float8 NOT NULL, qty int NOT NULL, weights float8[],
                    seen timestamptz NOT NULL);
INSERT INTO items
SELECT 'item-' || lpad(g::text, 5, '0'), g / 7.0, g % 13, ARRAY[g / 3.0, 0.1 * g],
       timestamptz '2024-03-01 00:00:00+00' + g * interval '1 minute'
FROM generate_series(1, 3000) g;
"""
TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "items"]


@dataclass
class Env:
    """The same data on both servers, pgleap capturing and replaying, pgbench writing through it."""

    source: LabServer
    target: LabServer
    dbname: str
    proxy: ProxyThread

    def admin(self) -> psycopg.Connection[Any]:
        """An autocommit connection to the admin console."""
        return console(self.proxy)

    def verify(self, tables: list[str], *, repair: bool) -> list[TableReport]:
        """The verification service's reports for `tables`, run in pgleap's loop."""
        assert self.proxy.proxy is not None
        reports: list[TableReport] = self.proxy.call(self.proxy.proxy.verifier().verify("app", tables, repair=repair))
        return reports


def make_database(server: LabServer, dbname: str) -> None:
    """pgbench's tables at scale 1 and ITEMS (deterministic: equal on both servers)."""
    server.psql(f"CREATE DATABASE {dbname}")
    subprocess.run([tool("pgbench"), "-i", "-s", "1", "-q", server.dsn(dbname)], check=True, capture_output=True)
    server.psql(ITEMS, dbname=dbname)


@pytest.fixture
def env(tmp_path: Path, pg_old: LabServer, target18: LabServer) -> Iterator[Env]:
    with replaying(tmp_path, pg_old, target18) as ready:
        yield ready


@contextlib.contextmanager
def replaying(
    tmp_path: Path, pg_old: LabServer, target18: LabServer, extra: str = "", *, upgrade_extra: str = "", sql: str = ""
) -> Iterator[Env]:
    """The same data on both servers (`sql` run on each too), capture and replay started from S; everything
    removed afterwards."""
    dbname = f"vf_{uuid.uuid4().hex[:10]}"
    for server in (pg_old, target18):
        make_database(server, dbname)
        if sql:
            server.psql(sql, dbname=dbname)
    source = ServerConfig(pg_old.host, pg_old.port, dbname, pg_old.superuser, pg_old.password)
    proxy = start_proxy(
        tmp_path,
        {"app": source},  # type: ignore[dict-item]
        targets={"app": target18},
        extra=extra,
        upgrade_extra=upgrade_extra,
    )
    try:
        with psycopg.connect(proxy.dsn("pgleap", "pgleap_admin", "admin-secret"), autocommit=True) as admin:
            admin.execute("START CAPTURE")
            record_copy_snapshot(
                tmp_path / "pgleap-state.db", pg_old.psql("SELECT txid_current_snapshot()", dbname=dbname)
            )
            admin.execute("START REPLAY")
        yield Env(pg_old, target18, dbname, proxy)
    finally:
        if proxy.proxy is not None:
            proxy.call(quiesce(proxy.proxy))
        proxy.stop()
        pg_old.psql(f"DROP DATABASE IF EXISTS {dbname}")
        target18.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def diverge(env: Env) -> dict[str, dict[str, set[tuple[str, ...]]]]:
    """Change 1,000 rows of pgbench_accounts, 10 of pgbench_tellers and 1 of items on the target, directly."""
    t = env.target
    db = env.dbname
    # accounts: 400 changed, 300 deleted, 300 inserted (keys the source never has).
    t.psql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 250 = 1", dbname=db)  # 400 rows
    t.psql("DELETE FROM pgbench_accounts WHERE aid % 333 = 2 AND aid <= 99900", dbname=db)  # 300 rows
    t.psql("INSERT INTO pgbench_accounts SELECT 200000 + g, 1, 0, '' FROM generate_series(1, 300) g", dbname=db)
    # tellers (10 rows in all at scale 1): 6 changed, 2 deleted, 2 inserted.
    t.psql("UPDATE pgbench_tellers SET filler = 'changed' WHERE tid <= 6", dbname=db)
    t.psql("DELETE FROM pgbench_tellers WHERE tid IN (9, 10)", dbname=db)
    t.psql("INSERT INTO pgbench_tellers (tid, bid, tbalance) VALUES (11, 1, 0), (12, 1, 0)", dbname=db)
    # items: one float nudged by a few units in the last place (equal as text before PG 12's output).
    t.psql("UPDATE items SET price = price * (1 + 1e-15) WHERE code = 'item-01500'", dbname=db)
    deleted = {(str(a),) for a in range(1, 99901) if a % 333 == 2}
    return {
        "public.pgbench_accounts": {
            "different": {(str(a),) for a in range(1, 100001) if a % 250 == 1} - deleted,
            "missing_on_target": deleted,
            "extra_on_target": {(str(200000 + g),) for g in range(1, 301)},
        },
        "public.pgbench_tellers": {
            "different": {(str(i),) for i in range(1, 7)},
            "missing_on_target": {("9",), ("10",)},
            "extra_on_target": {("11",), ("12",)},
        },
        "public.items": {"different": {("item-01500",)}},
    }


def found(report: TableReport) -> dict[str, set[tuple[str, ...]]]:
    """The keys a verification found, by kind of difference."""
    kinds: dict[str, set[tuple[str, ...]]] = {}
    for d in report.verification.differences:
        kinds.setdefault(d.kind, set()).add(d.key)
    return kinds


def test_verification_under_load_finds_every_difference_and_resync_repairs_them(env: Env) -> None:
    """0 false positives in 5 runs under load; recall 100% on 1, 10 and 1,000 rows; repaired; equal."""
    bench = subprocess.Popen(
        [tool("pgbench"), "-n", "-c", "4", "-j", "2", "-T", "600", "-M", "prepared", env.proxy.dsn()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with env.admin() as admin:
            wait_for(lambda: int(show(admin, "SHOW REPLAY")[0]["applied"]) > 200, "pgbench writes to be replayed")
            for run in range(5):
                rows = show(admin, "VERIFY ALL TABLES")
                assert sorted(r["table"] for r in rows) == sorted(f"public.{t}" for t in TABLES)
                noisy = [r for r in rows if r["clean"] != "t" or r["whole_table_differs"] != "f" or r["example_keys"]]
                assert not noisy, f"run {run + 1}: false positives under load: {noisy}"
                history = next(r for r in rows if r["table"] == "public.pgbench_history")
                assert history["keyed"] == "f" and int(history["source_rows"]) > 0
            assert bench.poll() is None, "pgbench stopped early"

            expected = diverge(env)
            reports = {r.verification.table: r for r in env.verify(sorted(expected), repair=False)}
            for table, kinds in expected.items():
                assert found(reports[table]) == kinds, f"{table}: found {found(reports[table])}"
                assert reports[table].verification.points >= 2  # a chunk round, then rows

            # Over the console, with resync_on_error (the default): found again, repaired, checked again.
            for table, kinds in expected.items():
                (row,) = show(admin, f"VERIFY TABLE '{table}'")
                assert int(row["different"]) == len(kinds.get("different", ()))
                assert int(row["missing_on_target"]) == len(kinds.get("missing_on_target", ()))
                assert int(row["extra_on_target"]) == len(kinds.get("extra_on_target", ()))
                assert row["repairs"] == "1" and row["clean"] == "t", row
            for report in env.verify(sorted(expected), repair=False):
                assert report.verification.clean, f"{report.verification.table} still differs after re-sync"
            (status,) = show(admin, "SHOW UPGRADE STATUS")
            assert status["replaying"] == "t" and status["tables_differing"] == "0"
            assert not [r for r in show(admin, "SHOW UPGRADE ERRORS") if r["kind"] == "table_differs"]
            assert bench.poll() is None, "pgbench stopped early"
    finally:
        bench.terminate()
        bench.communicate(timeout=60)

    assert env.proxy.proxy is not None
    capture = env.proxy.proxy.databases["app"].capture
    env.proxy.call(capture.drain())  # the COMMITs in flight when pgbench was stopped are settled
    with env.admin() as admin:
        # A COMMIT pgbench sent just before it was stopped is settled from the source (txid_status).
        wait_for(lambda: show(admin, "SHOW CAPTURE")[0]["log_pending"] == "0", "no change-log record pending", 60)
        wait_for(lambda: show(admin, "SHOW REPLAY")[0]["lag_transactions"] == "0", "replay to catch up", 120)
    source = ServerConfig(env.source.host, env.source.port, env.dbname, env.source.superuser, env.source.password)
    target = ServerConfig(env.target.host, env.target.port, env.dbname, env.target.superuser, env.target.password)
    problems = asyncio.run(database_differences(source, target))
    assert not problems, "\n".join(problems)


def test_pgleap_verify_command_asks_the_running_pgleap(env: Env, tmp_path: Path) -> None:
    """`pgleap verify items` prints the table's verdict; a row changed on the target is found and re-synced."""
    command = [sys.executable, "-m", "pgleap.cli.main", "verify", "-c", str(tmp_path / "pgleap.toml")]
    command += ["--port", str(env.proxy.port)]
    wide = {**os.environ, "COLUMNS": "250"}
    first = subprocess.run([*command, "items"], capture_output=True, text=True, timeout=120, env=wide)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "public.items" in first.stdout and "yes" in first.stdout
    env.target.psql("UPDATE items SET qty = qty + 1 WHERE code = 'item-00042'", dbname=env.dbname)
    second = subprocess.run([*command, "public.items"], capture_output=True, text=True, timeout=120, env=wide)
    assert second.returncode == 0, second.stdout + second.stderr  # found, re-synced (resync_on_error), clean
    header = next(row for row in second.stdout.splitlines() if "different" in row)
    line = next(row for row in second.stdout.splitlines() if "public.items" in row)
    cells = dict(zip((h.strip() for h in header.split("┃")), (c.strip() for c in line.split("│")), strict=True))
    assert (cells["different"], cells["repairs"], cells["clean"]) == ("1", "1", "yes"), line
    query = "SELECT qty FROM items WHERE code = 'item-00042'"
    assert env.target.psql(query, dbname=env.dbname) == env.source.psql(query, dbname=env.dbname)
    unknown = subprocess.run([*command, "no_such_table"], capture_output=True, text=True, timeout=120, env=wide)
    assert unknown.returncode == 2 and "no table named 'no_such_table'" in unknown.stdout, unknown.stdout


def test_a_table_flagged_by_a_skipped_transaction_is_resynced_by_itself(
    tmp_path: Path, pg_old: LabServer, target18: LabServer
) -> None:
    """on_apply_error = "skip_and_resync": the refused INSERT is skipped, its table re-synced, unflagged."""
    with replaying(tmp_path, pg_old, target18, extra='on_apply_error = "skip_and_resync"') as env:
        env.target.psql("INSERT INTO items SELECT 'zz-target', 1, 1, NULL, now()", dbname=env.dbname)
        with psycopg.connect(env.proxy.dsn(), autocommit=True) as app:
            app.execute("INSERT INTO items VALUES ('zz-target', 2.5, 7, NULL, '2024-01-01 00:00:00+00')")
            app.execute("UPDATE items SET qty = 99 WHERE code = 'item-00001'")
        assert env.proxy.proxy is not None and env.proxy.proxy.replay is not None
        journal = env.proxy.proxy.replay.journal
        wait_for(lambda: journal.errors("app"), "the refused INSERT to be skipped", 30)
        assert journal.errors("app")[0].sqlstate == "23505"
        # Flagged, then found (the target's own row differs), re-synced and unflagged by pgleap itself.
        wait_for(lambda: not journal.resync_tables("app"), "the flagged table to be re-synced", 60)
        query = (
            "SELECT code, encode(float8send(price), 'hex'), qty FROM items "
            "WHERE code IN ('zz-target', 'item-00001') ORDER BY code"
        )
        assert env.target.psql(query, dbname=env.dbname) == env.source.psql(query, dbname=env.dbname)
        reports = env.proxy.proxy.verifier().reports
        assert reports and reports[-1].repairs and reports[-1].clean


BUMP = """
CREATE FUNCTION bump(c text) RETURNS void LANGUAGE sql AS $$ UPDATE items SET qty = qty + 1 WHERE code = c $$;
"""


def test_a_skipped_transaction_whose_writes_name_no_table_has_every_table_verified(
    tmp_path: Path, pg_old: LabServer, target18: LabServer
) -> None:
    """`SELECT bump(...)` writes items inside a function: skipped, it flags every table (cutover waits for it),
    and pgleap verifies every table, finds items, re-syncs it and clears the flag."""
    with replaying(tmp_path, pg_old, target18, extra='on_apply_error = "skip_and_resync"', sql=BUMP) as env:
        refuse = "CREATE OR REPLACE FUNCTION bump(c text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE 'no'; END $$"
        env.target.psql(refuse, dbname=env.dbname)
        with psycopg.connect(env.proxy.dsn(), autocommit=True) as app:
            app.execute("SELECT bump('item-00002')")
        assert env.proxy.proxy is not None and env.proxy.proxy.replay is not None
        journal = env.proxy.proxy.replay.journal
        wait_for(lambda: journal.errors("app"), "the refused SELECT to be skipped", 30)
        (skipped,) = journal.errors("app")
        assert (skipped.sqlstate, skipped.action, skipped.resync_tables) == ("P0001", "skipped", ("*",))
        started = len(env.proxy.proxy.verifier().reports)
        wait_for(lambda: not journal.resync_tables("app"), "every table to be verified for the flag", 90)
        query = "SELECT qty FROM items WHERE code = 'item-00002'"
        assert env.target.psql(query, dbname=env.dbname) == env.source.psql(query, dbname=env.dbname)
        reports = env.proxy.proxy.verifier().reports[started:]
        assert {r.verification.table for r in reports} >= {f"public.{t}" for t in TABLES}
        (items,) = [r for r in reports if r.verification.table == "public.items"]
        assert items.repairs and items.clean


READINGS = """
CREATE TABLE readings (id int NOT NULL, at date NOT NULL, v int) PARTITION BY RANGE (at);
CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE readings_2025 PARTITION OF readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO readings SELECT g, date '2024-06-01' + g, g FROM generate_series(1, 400) g;
CREATE TABLE base (id int PRIMARY KEY); CREATE TABLE child () INHERITS (base);
INSERT INTO base VALUES (1); INSERT INTO child VALUES (2);
CREATE VIEW cheap AS SELECT * FROM items WHERE price < 10;
CREATE SCHEMA shop; CREATE VIEW shop.items AS SELECT * FROM public.items;
"""


def test_re_sync_flags_on_a_partitioned_table_or_a_view_can_be_cleared(
    tmp_path: Path, pg_old: LabServer, target18: LabServer
) -> None:
    """A flag names what a statement wrote: a parent stands for its partitions or children, a view for every
    table. FORCE RESYNC TABLE on the parent copies them all and clears its flag; a clean VERIFY ALL TABLES
    clears the view's. A bare name that is a table in one schema and a view in another is the view's too.
    Before, only INITIATE CUTOVER FORCE got past a flag on a partitioned parent or a view."""
    no_watcher = "[auto_upgrade.sync]\nresync_on_error = false"
    with replaying(tmp_path, pg_old, target18, upgrade_extra=no_watcher, sql=READINGS) as env:
        assert env.proxy.proxy is not None and env.proxy.proxy.replay is not None
        journal = env.proxy.proxy.replay.journal
        env.target.psql("DELETE FROM readings_2025 WHERE id = 300; DELETE FROM child", dbname=env.dbname)
        for name in ("readings", "cheap", "public.readings", "base", "items"):
            journal.mark_resync("app", (name,), 1, "stands in for a skipped txid", required=True)
        with env.admin() as admin:
            rows = show(admin, "FORCE RESYNC TABLE 'readings'")
            assert sorted(r["table"] for r in rows) == ["public.readings_2024", "public.readings_2025"]
            rows = show(admin, "FORCE RESYNC TABLE 'base'")
            assert sorted(r["table"] for r in rows) == ["public.base", "public.child"]
            assert journal.required_resyncs("app") == ["cheap", "items"]
            for query in ("SELECT count(*) FROM readings_2025", "SELECT count(*) FROM child"):
                assert env.target.psql(query, dbname=env.dbname) == env.source.psql(query, dbname=env.dbname)
            show(admin, "VERIFY TABLE 'public.items'")  # clean, but shop.items is a view: "items" stays
            assert journal.required_resyncs("app") == ["cheap", "items"]
            env.target.psql("DELETE FROM readings_2024 WHERE id = 5", dbname=env.dbname)
            first = show(admin, "VERIFY ALL TABLES")  # no repair: readings_2024 differs, so the views' flags stay
            assert [r["table"] for r in first if r["clean"] != "t"] == ["public.readings_2024"]
            assert journal.required_resyncs("app") == ["cheap", "items"]
            show(admin, "FORCE RESYNC TABLE 'readings_2024'")
            second = show(admin, "VERIFY ALL TABLES")
            assert all(r["clean"] == "t" for r in second) and len(second) == len(TABLES) + 4
            assert journal.required_resyncs("app") == []
