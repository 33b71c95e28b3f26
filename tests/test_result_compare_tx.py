"""Reads inside write transactions, compared while that transaction is replayed (PG 10 source, PG 18 target).

A SELECT inside a transaction that wrote sees the transaction's own uncommitted writes. Capture hashes its
result as it streams and records a check in the transaction's change-log record, at its place among the
statements; replay runs it there on the target, inside a savepoint that is always rolled back, and the
validator classifies it like any sampled read.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.store.records import (
    FORMAT_V1,
    FORMAT_V2,
    CapturedCheck,
    CapturedStatement,
    CapturedTransaction,
    LoggedTransaction,
    decode_transaction,
    encode_transaction,
)
from pgleap.testing import ProxyThread, render_config
from pgleap.upgrade.verify.results import QueryStats, ResultValidator

from conftest import console, quiesce, record_copy_snapshot, show, wait_for

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0);
INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 50) g;
"""
# Reads of these views are reads (no function call: capture keeps a SELECT calling a user function as a
# possible write). On the target, boom divides by zero (target_error) and slow outlasts compare_timeout.
SOURCE_ONLY = """
CREATE TABLE legacy_only (id int);
CREATE VIEW boom AS SELECT id, n FROM items;
CREATE VIEW slow AS SELECT id, n FROM items;
"""
TARGET_ONLY = """
CREATE VIEW boom AS SELECT id, n / (id - id) AS n FROM items;
CREATE VIEW slow AS SELECT id, n FROM items, pg_sleep(4);
"""


@dataclass
class Env:
    """The proxy (capture and replay on, every read sampled), its source and target."""

    source: LabServer
    target: LabServer
    dbname: str
    proxy: ProxyThread

    @property
    def validator(self) -> ResultValidator:
        """The proxy's validator."""
        assert self.proxy.proxy is not None and self.proxy.proxy.validator is not None
        return self.proxy.proxy.validator

    def app(self) -> psycopg.Connection[Any]:
        """An application connection through pgleap; never prepares (each text keeps its protocol)."""
        return psycopg.connect(self.proxy.dsn(), autocommit=True, prepare_threshold=None)

    def records(self) -> list[LoggedTransaction]:
        """Every committed record of the change log."""
        changelog = self.validator._changelog()
        assert changelog is not None
        return changelog.read_committed("app", 0, 10_000)

    def queries(self) -> dict[str, QueryStats]:
        """Compared reads by example text."""
        return {q.example: q for q in self.validator.queries()}

    def wait_compared(self, expected: dict[str, dict[str, int]]) -> dict[str, QueryStats]:
        """Until every read in `expected` has its counts (replay judges checks as it applies their transaction)."""

        def reached() -> dict[str, QueryStats] | None:
            queries = self.queries()
            done = all(sql in queries and queries[sql].counts == counts for sql, counts in expected.items())
            return queries if done else None

        self.proxy.call(self.validator.wait_idle(60))
        try:
            return wait_for(reached, "the reads' comparisons", timeout=60)
        except BaseException:  # pytest.fail raises an OutcomeException
            got = {sql: q.counts for sql, q in self.queries().items()}
            raise AssertionError(f"expected {expected}, got {got}; metrics {self.validator.metrics()}") from None

    def table(self, server: LabServer) -> str:
        """The items table, in order, as text."""
        return server.psql("SELECT id, v, n FROM items ORDER BY id", dbname=self.dbname)


@pytest.fixture
def env(tmp_path: Path, pg_old: LabServer, target18: LabServer) -> Iterator[Env]:
    dbname = f"rctx_{uuid.uuid4().hex[:10]}"
    for server, extra in ((pg_old, SOURCE_ONLY), (target18, TARGET_ONLY)):
        server.psql(f"CREATE DATABASE {dbname}")
        server.psql(SCHEMA + extra, dbname=dbname)
    source = ServerConfig(pg_old.host, pg_old.port, dbname, pg_old.superuser, pg_old.password)
    target = ServerConfig(target18.host, target18.port, dbname, target18.superuser, target18.password)
    config = tmp_path / "pgleap.toml"
    text = render_config({"app": source}, targets={"app": target})
    config.write_text(text + '\n[auto_upgrade.validation]\nsample_rate = 1.0\ncompare_timeout = "2s"\n')
    proxy = ProxyThread(config).start()
    try:
        with psycopg.connect(proxy.dsn("pgleap", "pgleap_admin", "admin-secret"), autocommit=True) as admin:
            admin.execute("START CAPTURE")
            record_copy_snapshot(tmp_path / "pgleap-state.db", pg_old.psql("SELECT txid_current_snapshot()"))
            admin.execute("START REPLAY")
        yield Env(pg_old, target18, dbname, proxy)
    finally:
        if proxy.proxy is not None:
            proxy.call(quiesce(proxy.proxy))
        proxy.stop()
        pg_old.psql(f"DROP DATABASE IF EXISTS {dbname}")
        target18.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def test_reads_see_their_own_writes_and_match(env: Env) -> None:
    """INSERT then SELECT, UPDATE then SELECT, in both protocols: the reads see the writes and all match."""
    with env.app() as app:
        with app.transaction():
            app.execute("INSERT INTO items VALUES (101, 'new', 7)")
            # I2: the client sees its own write, as directly.
            assert app.execute("SELECT count(*) FROM items").fetchall() == [(51,)]
            assert app.execute("SELECT * FROM items WHERE id = 101").fetchall() == [(101, "new", 7)]
            app.execute("UPDATE items SET n = n + 100 WHERE id <= 3")
            assert app.execute("SELECT sum(n) FROM items").fetchall() == [(1275 + 7 + 300,)]
            app.execute("SELECT id, n FROM items WHERE id <= 3 ORDER BY id DESC").fetchall()
        with app.transaction():  # the extended protocol: parameters are sent again
            app.execute("UPDATE items SET v = %s WHERE id = %s", ("updated", 20))
            assert app.execute("SELECT v FROM items WHERE id = %s", (20,)).fetchall() == [("updated",)]
            app.execute("DELETE FROM items WHERE id > %s", (45,))
            assert app.execute("SELECT count(*) FROM items WHERE id > %s", (40,)).fetchall() == [(5,)]
        with app.transaction():
            # A read after a rolled-back write saw it: no check. One after the rollback is compared.
            app.execute("INSERT INTO items VALUES (102, 'kept', 1)")
            app.execute("SAVEPOINT s")
            app.execute("INSERT INTO items VALUES (103, 'undone', 1)")
            assert app.execute("SELECT count(*) FROM items WHERE id > 100").fetchall() == [(2,)]  # 101 was deleted
            app.execute("ROLLBACK TO SAVEPOINT s")
            assert app.execute("SELECT max(id) FROM items").fetchall() == [(102,)]
        # A write transaction that rolls back records nothing.
        tx = app.transaction()
        with pytest.raises(ZeroDivisionError), tx:
            app.execute("UPDATE items SET n = 0 WHERE id = 10")
            app.execute("SELECT n FROM items WHERE id = 10").fetchall()
            raise ZeroDivisionError
        # A read-only transaction logs nothing: its read is compared at its log point, as one outside.
        with app.transaction():
            app.execute("SELECT v FROM items WHERE id < 5").fetchall()

    expected = {
        "SELECT count(*) FROM items": {"match": 1},
        "SELECT * FROM items WHERE id = 101": {"match": 1},
        "SELECT sum(n) FROM items": {"match": 1},
        "SELECT id, n FROM items WHERE id <= 3 ORDER BY id DESC": {"match": 1},
        "SELECT v FROM items WHERE id = $1": {"match": 1},
        "SELECT count(*) FROM items WHERE id > $1": {"match": 1},
        "SELECT max(id) FROM items": {"match": 1},
        "SELECT v FROM items WHERE id < 5": {"match": 1},
    }
    queries = env.wait_compared(expected)
    assert "SELECT count(*) FROM items WHERE id > 100" not in queries
    assert "SELECT n FROM items WHERE id = 10" not in queries
    m = env.validator.metrics()
    assert (m.total, m.matching, m.dropped, m.inconclusive) == (8, 8, 0, 0), m
    assert m.skipped == {"rolled_back": 2}, m  # the read the savepoint took back, the rolled-back one

    # The record format: each check at its place among the statements, with the source's digest.
    checks = [(r.transaction.statements, c) for r in env.records() for c in r.transaction.checks]
    assert [(c.sql, c.before, c.extended, c.rows) for _, c in checks] == [
        ("SELECT count(*) FROM items", 1, False, 1),
        ("SELECT * FROM items WHERE id = 101", 1, False, 1),
        ("SELECT sum(n) FROM items", 2, False, 1),
        ("SELECT id, n FROM items WHERE id <= 3 ORDER BY id DESC", 2, False, 3),
        ("SELECT v FROM items WHERE id = $1", 1, True, 1),
        ("SELECT count(*) FROM items WHERE id > $1", 2, True, 1),
        ("SELECT max(id) FROM items", 1, False, 1),
    ]
    assert (checks[4][1].params, checks[4][1].param_formats) == ((b"\x00\x14",), (1,))  # psycopg: binary int2
    # Replay applied the writes around the checks, and the checks changed nothing.
    assert env.table(env.source) == env.table(env.target)


def test_differences_and_target_errors_inside_transactions(env: Env) -> None:
    """A row changed on the target is a data_mismatch; refused reads are classified and never break replay."""
    env.target.psql("UPDATE items SET v = 'changed on the target' WHERE id = 7", dbname=env.dbname)
    with env.app() as app:
        with app.transaction():
            app.execute("UPDATE items SET n = n + 1 WHERE id = 7")
            app.execute("SELECT v, n FROM items WHERE id = 7").fetchall()
            app.execute("INSERT INTO items VALUES (201, 'after a mismatch', 1)")
        with app.transaction():
            app.execute("INSERT INTO items VALUES (202, 'x', 2)")
            # PG 12 removed pg_class.relhasoids: the source (PG 10) answers, the target refuses.
            assert app.execute("SELECT relhasoids FROM pg_class WHERE relname = 'items'").fetchall() == [(False,)]
            app.execute("UPDATE items SET n = n + 1 WHERE id = 202")  # after the refused read: still applied
            assert app.execute("SELECT n FROM boom WHERE id = 202").fetchall() == [(3,)]
            app.execute("SELECT n FROM slow WHERE id = 202").fetchall()
            app.execute("UPDATE items SET v = 'last' WHERE id = 202")
        with app.transaction():  # the same in the extended protocol
            app.execute("UPDATE items SET n = n + %s WHERE id = %s", (1, 7))
            app.execute("SELECT v, n FROM items WHERE id = %s", (7,)).fetchall()
            app.execute("SELECT count(*) FROM legacy_only WHERE id = %s", (7,)).fetchall()  # not on the target
            app.execute("INSERT INTO items VALUES (%s, %s, %s)", (203, "extended", 3))
        with app.transaction():
            app.execute("UPDATE items SET n = 0 WHERE id = 1")
            app.execute("SELECT n FROM items WHERE id = 1").fetchall()

    expected = {
        # Both protocols' reads, grouped under one fingerprint (the simple one's text is the example).
        "SELECT v, n FROM items WHERE id = 7": {"data_mismatch": 2},
        "SELECT relhasoids FROM pg_class WHERE relname = 'items'": {"feature_incompatibility": 1},
        "SELECT n FROM boom WHERE id = 202": {"target_error": 1},
        "SELECT n FROM slow WHERE id = 202": {"timeout": 1},
        "SELECT count(*) FROM legacy_only WHERE id = $1": {"feature_incompatibility": 1},
        "SELECT n FROM items WHERE id = 1": {"match": 1},
    }
    env.wait_compared(expected)
    m = env.validator.metrics()
    assert (m.total, m.matching, m.data_mismatches, m.timeouts, m.target_errors) == (7, 1, 2, 1, 1), m
    assert m.feature_incompatibilities == {"undefined_column": 1, "undefined_table": 1}
    details = {f.classification: f.detail for f in env.validator.recent_failures(20)}
    assert "values" in details["data_mismatch"] and "inside its replayed transaction" in details["data_mismatch"]
    assert details["target_error"].startswith("22012")

    # Replay went on: not paused, every write landed, the checks left nothing behind.
    replayer = env.proxy.proxy.replay.replayer("app")  # type: ignore[union-attr]
    assert replayer.paused is None and replayer.divergence_count == 0
    wait_for(lambda: replayer.position == env.records()[-1].position, "replay to apply every record")
    source_rows = env.table(env.source).splitlines()
    target_rows = env.table(env.target).splitlines()
    differing = [(s, t) for s, t in zip(source_rows, target_rows, strict=True) if s != t]
    assert len(differing) == 1 and "changed on the target" in differing[0][1], differing
    assert any("202|last|3" in row for row in target_rows), target_rows

    with console(env.proxy) as admin:
        rows = {r["example"]: r for r in show(admin, "SHOW UPGRADE QUERIES")}
    assert rows["SELECT v, n FROM items WHERE id = 7"]["mismatches"] == "2"
    assert rows["SELECT n FROM items WHERE id = 1"]["mismatches"] == "0"


def test_record_format() -> None:
    """A record without checks stays in format 1 (readable as before); one with checks round-trips in format 2."""
    statement = CapturedStatement("UPDATE items SET n = 1", tag="UPDATE 1")
    plain = CapturedTransaction("app", 7, None, (("TimeZone", "UTC"),), (statement,), 3, 1.5)
    data = encode_transaction(plain)
    assert data[0] == FORMAT_V1
    # Format 1 as an older pgleap wrote it: seven fields, no checks.
    old = bytes([FORMAT_V1]) + msgpack.packb(
        [
            "app",
            7,
            None,
            [["TimeZone", "UTC"]],
            [["UPDATE items SET n = 1", [], [], [], None, "UPDATE 1", None]],
            3,
            1.5,
        ]
    )
    assert data == old and decode_transaction(old) == plain
    check = CapturedCheck(
        before=1,
        sql="SELECT v FROM items WHERE id = $1",
        extended=True,
        params=(b"\x00\x14", None),
        param_formats=(1, 0),
        param_types=(21, 25),
        settings=(("DateStyle", "ISO, MDY"),),
        columns=(("v", 25),),
        rows=1,
        multiset=(1 << 64) - 1,
        sequence=None,
        source_seconds=0.25,
        low_log_id=41,
        seen_at=1.0,
    )
    with_checks = CapturedTransaction("app", 7, None, (), (statement,), 3, 1.5, checks=(check,))
    data = encode_transaction(with_checks)
    assert data[0] == FORMAT_V2 and decode_transaction(data) == with_checks
