"""`pgleap check --from-console`: the workload check on what a running pgleap captured.

A pgleap captures and replays in front of PG 10 (target PG 18, every read compared) while the failing-query
workload of test_check.py runs through it; SHOW UPGRADE QUERY TEXTS lists each sampled read and each logged
write once, with its full text; `pgleap check --from-console` against the PG 18 target lists exactly the
queries that fail there.
"""

from __future__ import annotations

import json
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
from pgleap.lab import Lab, LabServer
from pgleap.store.records import CapturedStatement, CapturedTransaction, LoggedTransaction, LogState
from pgleap.testing import ProxyThread, render_config
from pgleap.upgrade.check.captured import READ, WRITE, CapturedText, texts_for_check, write_texts
from pgleap.upgrade.check.workload import distinct
from test_check import DIRTY_SCHEMA, WORKLOAD

from conftest import console, quiesce, record_copy_snapshot, show

# The statements of WORKLOAD that reach a source through pgleap and are captured: reads result comparison
# samples, and writes. Left out, and why:
# - those that fail on PG 10 too: the source's error ends the sample, and a failed write is never logged;
# - SET/SHOW outside a writing transaction: neither a read nor a write (the SETs come as SET LOCAL below);
# - DDL, VACUUM and BEGIN: not queries to compare (the check lists them as not checked anyway).
LEFT_OUT = {"SHOW work_mem", "SET statement_timeout = 1000", "SET default_with_oids = on"}
LEFT_OUT |= {"SET operator_precedence_warning = on", "CREATE TABLE x (a int)", "VACUUM t_idx", "BEGIN"}
CAPTURED = [(q, s) for q, _, s in WORKLOAD if s not in ("fails_on_source_too", "skipped") and q not in LEFT_OUT]
# pglast cannot parse it: run last of the reads (see test_result_compare.py).
UNPARSEABLE = "SELECT 5 !"
# The last transaction: its SET LOCALs are logged with its write. Replay to PG 18 stops on it (the target
# rejects both settings), which is why it comes after every read has been compared.
SET_LOCALS = ["SET LOCAL operator_precedence_warning = on", "SET LOCAL default_with_oids = on"]
LAST_WRITE = "INSERT INTO t_idx VALUES (99)"
# Longer than SHOW UPGRADE QUERIES' 200-character example: the texts command gives it whole.
LONG_READ = "SELECT " + ", ".join(f"a * {i} AS times_{i}" for i in range(1, 30)) + " FROM t_idx"


@dataclass
class Env:
    """The proxy in front of the PG 10 source, replaying to the PG 18 target; its config file."""

    source: LabServer
    target: LabServer
    proxy: ProxyThread
    config: Path


@pytest.fixture(scope="module")
def source10(lab: Lab) -> Iterator[LabServer]:
    """A PG 10 server with the dirty database of test_check.py."""
    server = lab.primary(10)
    server.psql("CREATE DATABASE chk_dirty")
    # Its database-level settings are about the rules, not the workload: left out (force_parallel_mode...).
    schema = "\n".join(line for line in DIRTY_SCHEMA.splitlines() if not line.startswith("ALTER DATABASE"))
    server.psql(schema, dbname="chk_dirty")
    # Rows for the workload's UPDATE and DELETE to change: a write that changes nothing is not logged.
    server.psql("INSERT INTO t_idx SELECT generate_series(1, 10)", dbname="chk_dirty")
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path: Path, source10: LabServer, target18: LabServer) -> Iterator[Env]:
    # The copy stand-in on the target: what replay writes to (the reads that fail there are the point).
    dbname = f"chk_{uuid.uuid4().hex[:10]}"
    target18.psql(f"CREATE DATABASE {dbname}")
    target18.psql("CREATE TABLE t_idx (a int)", dbname=dbname)
    for row in source10.psql("SELECT a FROM t_idx", dbname="chk_dirty").split():
        target18.psql(f"INSERT INTO t_idx VALUES ({row})", dbname=dbname)
    source = ServerConfig(source10.host, source10.port, "chk_dirty", source10.superuser, source10.password)
    target = ServerConfig(target18.host, target18.port, dbname, target18.superuser, target18.password)
    config = tmp_path / "pgleap.toml"
    text = render_config({"app": source}, targets={"app": target})
    config.write_text(text + '\n[auto_upgrade.validation]\nsample_rate = 1.0\ncompare_timeout = "2s"\n')
    proxy = ProxyThread(config).start()
    try:
        with console(proxy) as admin:
            admin.execute("START CAPTURE")
            snapshot = source10.psql("SELECT txid_current_snapshot()", dbname="chk_dirty")
            record_copy_snapshot(tmp_path / "pgleap-state.db", snapshot)
            admin.execute("START REPLAY")
        yield Env(source10, target18, proxy, config)
    finally:
        if proxy.proxy is not None:
            proxy.call(quiesce(proxy.proxy))
        proxy.stop()
        target18.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def settle(env: Env) -> None:
    """Until every sample has been compared (or given up)."""
    assert env.proxy.proxy is not None and env.proxy.proxy.validator is not None
    env.proxy.call(env.proxy.proxy.validator.wait_idle(60))


def run(app: psycopg.Connection[Any], sql: str) -> None:
    """One statement as an application sends it: $n ones bound (extended protocol), others as a simple Query."""
    if "$1" in sql:
        value = "t_idx" if "relname" in sql else 3
        app.execute(sql.replace("$1", "%s"), (value,))  # type: ignore[arg-type]  # psycopg's $n from %s
        return
    result = app.pgconn.exec_(sql.encode())
    assert result.status in (psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.COMMAND_OK), (
        sql,
        result.error_message,
    )


@pytest.mark.integration
def test_check_from_console_lists_exactly_the_failing_queries(env: Env) -> None:
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as app:
        for sql, _ in CAPTURED:
            if sql != UNPARSEABLE:
                run(app, sql)
        run(app, LONG_READ)
        settle(env)
        run(app, UNPARSEABLE)
        settle(env)
        # pg_start_backup ran for real on the source (the proxy forwards it): end that backup.
        env.source.psql("SELECT pg_stop_backup()", dbname="chk_dirty")
        with app.transaction():
            for sql in SET_LOCALS:
                app.execute(sql)  # type: ignore[arg-type]
            app.execute(LAST_WRITE)  # type: ignore[arg-type]

    with console(env.proxy) as admin:
        texts = show(admin, "SHOW UPGRADE QUERY TEXTS")
        compared = {r["example"]: r for r in show(admin, "SHOW UPGRADE QUERIES")}
    reads = {r["example"]: r for r in texts if r["source"] == READ}
    writes = {r["example"]: r for r in texts if r["source"] == WRITE}
    print(f"\nSHOW UPGRADE QUERY TEXTS: {len(reads)} reads, {len(writes)} writes")
    # Every captured statement is listed once, with the count of its fingerprint.
    expected_reads = {q for q, _ in CAPTURED if q.split()[0] not in ("UPDATE", "INSERT", "DELETE")} | {LONG_READ}
    expected_reads.discard("SELECT 2")  # one fingerprint with SELECT 1
    assert set(reads) == expected_reads, "\n".join(f"{r['source']} {r['count']} {r['example'][:70]}" for r in texts)
    assert reads["SELECT 1"]["count"] == "2" and all(r["database"] is None for r in reads.values())
    expected_writes = {"UPDATE t_idx SET a = a + 1 WHERE a = $1", "DELETE FROM t_idx WHERE a > 5", *SET_LOCALS}
    expected_writes.add("INSERT INTO t_idx VALUES (1)")  # LAST_WRITE has its fingerprint: counted with it
    assert set(writes) <= expected_writes | {UNPARSEABLE}, writes  # capture may log what it cannot parse
    assert expected_writes <= set(writes), writes
    assert writes["INSERT INTO t_idx VALUES (1)"]["count"] == "2" and writes[SET_LOCALS[0]]["database"] == "app"
    # The full text, where SHOW UPGRADE QUERIES cuts it.
    assert len(LONG_READ) > 200 and LONG_READ[:200] in compared and LONG_READ not in compared

    has_pgcrypto = "pgcrypto" in env.target.psql("SELECT name FROM pg_available_extensions").split()
    failing = {q for q, s in CAPTURED if s == "fails" or (s == "pgcrypto" and not has_pgcrypto)} | set(SET_LOCALS)
    argv = [sys.executable, "-m", "pgleap.cli.main", "check", "-c", str(env.config), "--from-console"]
    argv += ["--port", str(env.proxy.port), "--format", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    workload = json.loads(done.stdout)["workload"]
    got = {q["sql"]: q for q in workload}
    listed = {q for q, r in got.items() if r["status"] == "fails"}
    print(f"pgleap check --from-console: {len(workload)} distinct, {len(listed)} failing on PG {env.target.major}")
    assert listed == failing, {"missing": failing - listed, "unexpected": listed - failing}
    assert {r["status"] for r in workload} == {"ok", "fails"}, workload
    assert got["SELECT 1"]["count"] == 2 and got["INSERT INTO t_idx VALUES (1)"]["count"] == 2
    assert got["UPDATE t_idx SET a = a + 1 WHERE a = $1"]["how"] == "prepare"
    assert got["DELETE FROM t_idx WHERE a > 5"]["how"] == "explain"
    assert got[SET_LOCALS[0]]["how"] == "execute" and got[LONG_READ]["status"] == "ok"
    assert env.target.psql("SELECT count(*) FROM pg_database WHERE datname LIKE 'pgleap_check_%'") == "0"


# -- the two sources, without servers ------------------------------------------------------------------------


class _Log:
    """A change log holding committed records of two databases (read_committed pages by position)."""

    def __init__(self, records: dict[str, list[list[str]]]) -> None:
        self.records = records
        self.reads: list[tuple[str, int, int]] = []

    def read_committed(self, database: str, after_position: int, limit: int) -> list[LoggedTransaction]:
        self.reads.append((database, after_position, limit))
        out = []
        for position, statements in enumerate(self.records.get(database, []), start=1):
            if position > after_position and len(out) < limit:
                tx = CapturedTransaction(
                    database, position, None, (), tuple(CapturedStatement(s) for s in statements), 1
                )
                out.append(LoggedTransaction(position, position, LogState.COMMITTED, tx))
        return out


def test_write_texts_page_through_the_log_and_group_by_fingerprint() -> None:
    log = _Log(
        {
            "app": [[f"INSERT INTO t VALUES ({i})", "UPDATE t SET a = $1"] for i in range(7)] + [["DELETE FROM t"]],
            "other": [["INSERT INTO u VALUES (1)"]],
        }
    )
    found = write_texts(log, ["app", "other", "absent"], page=3)
    assert [(t.database, t.example, t.count) for t in found] == [
        ("app", "INSERT INTO t VALUES (0)", 7),
        ("app", "UPDATE t SET a = $1", 7),
        ("app", "DELETE FROM t", 1),
        ("other", "INSERT INTO u VALUES (1)", 1),
    ]
    assert [r[1] for r in log.reads if r[0] == "app"] == [0, 3, 6]  # pages of 3 by position
    assert write_texts(None, ["app"]) == []


def test_texts_for_check_keep_reads_and_the_entry_writes() -> None:
    rows = [
        CapturedText("a", READ, None, 3, "SELECT 1"),
        CapturedText("b", WRITE, "app", 2, "DELETE FROM t"),
        CapturedText("c", WRITE, "other", 1, "DELETE FROM u"),
    ]
    assert texts_for_check(rows, "app") == [("SELECT 1", 3), ("DELETE FROM t", 2)]
    assert len(texts_for_check(rows)) == 3
    # Counts add up per fingerprint, whether a text comes bare (a file) or counted (the console).
    assert distinct(["SELECT 1", ("SELECT 2", 4), "SELECT 5 !"]) == [("SELECT 1", 5), ("SELECT 5 !", 1)]


def test_from_console_needs_a_running_pgleap(tmp_path: Path) -> None:
    """Without -c it is a usage error; with a config but no pgleap running, exit 2 saying so."""
    base = [sys.executable, "-m", "pgleap.cli.main", "check", "--from-console"]
    source = ["--source", "postgresql://u:p@127.0.0.1:1/db"]
    usage = subprocess.run([*base, *source], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--from-console needs -c/--config" in usage.stderr, usage.stderr
    config = tmp_path / "pgleap.toml"
    config.write_text(render_config({"app": ServerConfig("127.0.0.1", 1, "db", "u", "p")}))
    down = subprocess.run([*base, "-c", str(config), "--port", "1"], capture_output=True, text=True, timeout=60)
    said = " ".join((down.stdout + down.stderr).split())  # rich wraps it to the terminal's width
    assert down.returncode == 2 and "is pgleap running with" in said, said
