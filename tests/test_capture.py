"""Capture through the proxy on real servers: exactly the committed write transactions reach the log."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.store import SQLiteChangeLog
from pgleap.testing import ProxyThread
from pgleap.upgrade.capture.capture import Capture

from conftest import capture_into, start_proxy, tool, wait_for
from rawclient import login_md5, query_message, read_until_ready

pytestmark = pytest.mark.integration


@pytest.fixture
def capturing(tmp_path: Path, backend: LabServer) -> Iterator[tuple[ProxyThread, Capture]]:
    """A proxy in front of `backend` with capture on for database "app"; table cap created empty."""
    backend.psql("drop table if exists cap; create table cap (id int primary key, txid bigint, v text)")
    proxy = start_proxy(tmp_path, {"app": backend})
    changelog = SQLiteChangeLog(tmp_path / "changes.db")
    capture = capture_into(proxy, changelog)
    try:
        yield proxy, capture
    finally:
        proxy.stop()
        changelog.close()


def logged(proxy: ProxyThread, capture: Capture) -> list[tuple[int | None, list[str]]]:
    """(txid, statement texts) of every committed transaction in the log, in log order."""
    proxy.call(capture.drain())
    records = capture.changelog.read_committed("app", 0, 10_000)
    return [(r.transaction.txid, [s.sql for s in r.transaction.statements]) for r in records]


@contextlib.contextmanager
def raw_session(tmp_path: Path, server: LabServer, schema: str) -> Iterator[tuple[socket.socket, ProxyThread, Capture]]:
    """A raw client logged in through a capturing proxy (statements, no row images) to `server`, after `schema`."""
    server.psql(schema)
    proxy = start_proxy(tmp_path, {"app": server}, users={"raw": ("raw-secret", "md5")})
    changelog = SQLiteChangeLog(tmp_path / "changes.db")
    try:
        capture = capture_into(proxy, changelog, row_images=False)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            login_md5(sock, "raw", "raw-secret")
            yield sock, proxy, capture
    finally:
        proxy.stop()
        changelog.close()


def test_committed_writes_are_logged_once_with_their_txids(
    capturing: tuple[ProxyThread, Capture], backend: LabServer
) -> None:
    proxy, capture = capturing
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        # Implicit transactions, extended protocol with parameters.
        conn.execute("insert into cap values (%s, txid_current(), 'implicit')", (1,))
        conn.execute("select * from cap")  # a read: not logged
        # An explicit transaction with a rolled-back savepoint.
        with conn.transaction():
            conn.execute("insert into cap values (2, txid_current(), 'explicit')")
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute("insert into cap values (3, txid_current(), 'undone by savepoint')")
                conn.execute("insert into cap values (2, txid_current(), 'duplicate')")
            conn.execute("insert into cap values (4, txid_current(), 'after savepoint')")
        # A rolled-back transaction.
        with pytest.raises(ZeroDivisionError), conn.transaction():
            conn.execute("insert into cap values (5, txid_current(), 'rolled back')")
            raise ZeroDivisionError
        # COPY FROM STDIN inside a transaction.
        with conn.transaction():
            with conn.cursor().copy("copy cap (id, v) from stdin") as copy:
                copy.write_row((6, "copied"))
                copy.write_row((7, "copied"))
            conn.execute("update cap set txid = txid_current() where id in (6, 7)")
        # Pipeline mode: several implicit transactions before one Sync each.
        with conn.pipeline():
            for i in (8, 9):
                conn.execute("insert into cap values (%s, txid_current(), 'pipelined')", (i,))
    # Simple protocol through psql: a multi-statement string (one implicit transaction), a failing one,
    # and an explicit transaction spread over statements.
    script = (
        "insert into cap values (10, txid_current(), 'multi'); insert into cap values (11, txid_current(), 'multi');\n"
        "insert into cap values (12, txid_current(), 'fails'); select 1/0;\n"
        "begin;\ninsert into cap values (13, txid_current(), 'psql tx');\ncommit;\n"
    )
    psql = subprocess.run(
        [
            tool("psql"),
            proxy.dsn(),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            script.split("\n")[0],
            "-c",
            script.split("\n")[1],
            "-f",
            "-",
        ],
        input="\n".join(script.split("\n")[2:]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "division by zero" in psql.stderr

    with psycopg.connect(backend.dsn()) as direct:
        rows = dict(direct.execute("select id, txid from cap").fetchall())
    assert sorted(rows) == [1, 2, 4, 6, 7, 8, 9, 10, 11, 13]

    entries = logged(proxy, capture)
    by_txid = {txid: statements for txid, statements in entries}
    assert len(by_txid) == len(entries), "a transaction was logged twice"
    # Exactly the committed write transactions, each once, identified by the source's txid.
    assert set(by_txid) == set(rows.values())
    assert len(by_txid[rows[2]]) == 2 and all("undone" not in s and "duplicate" not in s for s in by_txid[rows[2]])
    assert by_txid[rows[6]][0].startswith("copy cap") and len(by_txid[rows[6]]) == 2
    assert rows[10] == rows[11] and len(by_txid[rows[10]]) == 2
    assert capture.problems == []


def test_the_client_sees_nothing_injected(capturing: tuple[ProxyThread, Capture], backend: LabServer) -> None:
    """The same psql script gives byte-identical output through the capturing proxy and directly (I2)."""
    script = (
        "insert into cap values (1, 0, 'a') returning id, v;\n"
        "begin;\nupdate cap set v = 'b' where id = 1;\nselect v from cap;\ncommit;\n"
        "insert into cap values (2, 0, 'x'); select count(*) from cap;\n"
        "begin;\ninsert into cap values (3, 0, 'y');\nselect 1/0;\ncommit;\n"
        "delete from cap;\n"
    )
    proxy, capture = capturing

    def run(dsn: str) -> tuple[str, str]:
        result = subprocess.run(
            [tool("psql"), dsn, "-X", "-a", "-v", "ON_ERROR_STOP=0", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout, result.stderr.replace("psql:<stdin>", "")

    through = run(proxy.dsn())
    direct = run(backend.dsn())
    assert through == direct
    assert "ROLLBACK" in through[0]  # the failed transaction's COMMIT answered ROLLBACK, as directly
    assert len(logged(proxy, capture)) == 4  # the four write transactions of the run through pgleap


def test_capture_status_in_console_and_metrics(capturing: tuple[ProxyThread, Capture]) -> None:
    """SHOW CAPTURE and the capture metrics count what reached the log."""
    from pgleap.metrics import ProxyCollector

    proxy, capture = capturing
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(3):
            conn.execute("insert into cap values (%s, txid_current(), 'status')", (i,))
    proxy.call(capture.drain())
    admin_dsn = proxy.dsn(database="pgleap", user="pgleap_admin", password="admin-secret")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        cursor = admin.execute("SHOW CAPTURE")
        columns = [c.name for c in cursor.description or []]
        (row,) = [dict(zip(columns, r, strict=True)) for r in cursor.fetchall()]
    assert row["database"] == "app" and row["capturing"] == "t"
    assert row["transactions"] == "3" and row["log_failures"] == "0" and row["log_healthy"] == "t"
    # each COMMIT (here the Sync ending an implicit transaction) waited for its record, and that is shown
    assert row["commits_held"] == "3" and float(row["commit_hold_avg_ms"]) > 0
    assert proxy.proxy is not None
    samples = {s.name: s.value for m in ProxyCollector(proxy.proxy).collect() for s in m.samples}
    assert samples["pgleap_capture_transactions_total"] == 3
    assert samples["pgleap_changelog_healthy"] == 1
    assert samples["pgleap_capture_commit_hold_seconds_count"] == 3
    assert 0 < samples["pgleap_capture_commit_hold_seconds_sum"] < 10


def test_start_and_stop_capture_from_the_console(tmp_path: Path, pg_new: LabServer) -> None:
    """START CAPTURE switches connected sessions at their next transaction; STOP CAPTURE drains and stops."""
    pg_new.psql("drop table if exists cap2; create table cap2 (id int primary key, txid bigint)")
    proxy = start_proxy(tmp_path, {"app": pg_new}, extra=f'changelog_path = "{tmp_path / "log.db"}"')
    admin_dsn = proxy.dsn(database="pgleap", user="pgleap_admin", password="admin-secret")
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as app, psycopg.connect(admin_dsn, autocommit=True) as admin:
            app.execute("insert into cap2 values (1, txid_current())")  # before capture: not logged
            notes = [r[0] for r in admin.execute("START CAPTURE").fetchall()]
            assert notes == [f"database app: capturing into {tmp_path / 'log.db'}"]
            app.execute("insert into cap2 values (2, txid_current())")  # the same session, now captured
            notes = [r[0] for r in admin.execute("STOP CAPTURE").fetchall()]
            assert notes == ["database app: stopped; 1 transactions in the log"]
            app.execute("insert into cap2 values (3, txid_current())")  # after: not logged
            txid_2 = pg_new.psql("select txid from cap2 where id = 2")
        assert proxy.proxy is not None
        changelog = proxy.proxy._changelog
        records = changelog.read_committed("app", 0, 100)
        assert [r.transaction.txid for r in records] == [int(txid_2)]
    finally:
        proxy.stop()


def test_start_capture_again_leaves_a_commit_in_flight_to_its_own_answer(
    tmp_path: Path, pg_new: LabServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COMMIT still running after STOP CAPTURE keeps its record: START CAPTURE does not take it for a crash's."""
    from pgleap.upgrade.capture import recovery

    # Recovery asks txid_status while it says "in progress", this long, then calls the record unresolved.
    monkeypatch.setattr(recovery, "IN_PROGRESS_WAIT", 0.3)
    pg_new.psql(
        "drop table if exists cap_slow; create table cap_slow (id int primary key);"
        "create or replace function cap_slow() returns trigger language plpgsql as "
        "$$ begin perform pg_sleep(2); return null; end $$;"
        "create constraint trigger cap_slow after insert on cap_slow deferrable initially deferred "
        "for each row execute procedure cap_slow()"
    )
    proxy = start_proxy(tmp_path, {"app": pg_new}, extra=f'changelog_path = "{tmp_path / "log.db"}"')
    admin_dsn = proxy.dsn(database="pgleap", user="pgleap_admin", password="admin-secret")
    try:
        with psycopg.connect(proxy.dsn()) as app, psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute("START CAPTURE")
            app.execute("insert into cap_slow values (1)")
            failures: list[BaseException] = []

            def commit() -> None:
                try:
                    app.commit()  # answered after the trigger's 2 s sleep
                except BaseException as exc:  # reported by the test thread
                    failures.append(exc)

            committing = threading.Thread(target=commit)
            committing.start()
            time.sleep(0.3)
            admin.execute("STOP CAPTURE")
            notes = [r[0] for r in admin.execute("START CAPTURE").fetchall()]
            assert not any("left pending" in n for n in notes), notes
            committing.join(timeout=30)
            assert not committing.is_alive(), "the COMMIT's answer never reached the client"
            assert not failures, failures
        assert proxy.proxy is not None
        changelog = proxy.proxy._changelog
        assert changelog is not None
        wait_for(lambda: not changelog.pending(), "the COMMIT's record to be settled by its answer", timeout=30)
        time.sleep(0.5)  # past IN_PROGRESS_WAIT: a recovery started by mistake would have called it unresolved
        assert changelog.unresolved() == []
        assert [r.transaction.txid is not None for r in changelog.read_committed("app", 0, 10)] == [True]
    finally:
        proxy.stop()
        pg_new.psql("drop table if exists cap_slow; drop function if exists cap_slow()")


def test_stop_capture_leaves_a_session_midway_through_a_message_whole(tmp_path: Path, pg_new: LabServer) -> None:
    """STOP CAPTURE does not switch a session that has read part of a message: it switches at the message's end."""
    pg_new.psql("drop table if exists cap4; create table cap4 (id int primary key, note text)")
    proxy = start_proxy(
        tmp_path,
        {"app": pg_new},
        users={"raw": ("raw-secret", "md5")},
        extra=f'changelog_path = "{tmp_path / "log.db"}"',
    )
    admin_dsn = proxy.dsn(database="pgleap", user="pgleap_admin", password="admin-secret")
    try:
        with (
            psycopg.connect(admin_dsn, autocommit=True) as admin,
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
        ):
            login_md5(sock, "raw", "raw-secret")
            admin.execute("START CAPTURE")
            query = query_message("insert into cap4 values (1, '" + "x" * 2000 + "')")
            sock.sendall(query[:30])  # the capture path holds the first part of the message
            time.sleep(0.2)
            admin.execute("STOP CAPTURE")
            sock.sendall(query[30:])
            answers = read_until_ready(sock)
            assert (b"C", b"INSERT 0 1\0") in answers, answers
            sock.sendall(query_message("insert into cap4 values (2, 'after')"))  # now on the plain path
            assert (b"C", b"INSERT 0 1\0") in read_until_ready(sock)
        assert pg_new.psql("select string_agg(id::text, ',' order by id) from cap4") == "1,2"
        assert proxy.proxy is not None
        changelog = proxy.proxy._changelog
        wait_for(lambda: not changelog.pending(), "nothing pending in the change log")
        # Its transaction began after STOP CAPTURE answered: the session switched at the message, uncaptured.
        assert changelog.read_committed("app", 0, 100) == []
    finally:
        proxy.stop()


def _send_split(sock: socket.socket, data: bytes, at: int) -> list[tuple[bytes, bytes]]:
    """`data` in two writes `at` bytes apart, 0.2 s between them; the answers up to ReadyForQuery."""
    sock.sendall(data[:at])
    time.sleep(0.2)  # the proxy reads the first part on its own
    sock.sendall(data[at:])
    return read_until_ready(sock)


def test_messages_split_across_the_switch_into_capture_arrive_whole(tmp_path: Path, pg_new: LabServer) -> None:
    """A session switches into capture at a message boundary, with whatever part of the next message it holds.

    A message whose body was already on its way when capture switched on is forwarded whole by the plain path
    (its transaction was not captured: the session switches after it). A partial header held at the switch is
    completed on the capture path, and that statement is logged.
    """
    pg_new.psql("drop table if exists cap3; create table cap3 (id int primary key, note text)")
    proxy = start_proxy(tmp_path, {"app": pg_new}, users={"raw": ("raw-secret", "md5")})
    changelog = SQLiteChangeLog(tmp_path / "changes.db")
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            login_md5(sock, "raw", "raw-secret")
            before = query_message("insert into cap3 values (1, 'begun before the switch')")
            sock.sendall(before[:20])  # header and part of the body, on the plain path
            time.sleep(0.2)
            capture = capture_into(proxy, changelog, row_images=False)
            sock.sendall(before[20:])
            answers = read_until_ready(sock)
            assert (b"C", b"INSERT 0 1\0") in answers, answers
            after = query_message("insert into cap3 values (2, 'held as 3 bytes at the switch')")
            answers = _send_split(sock, after, 3)  # a partial header: the session switches holding it
            assert (b"C", b"INSERT 0 1\0") in answers, answers
            answers = _send_split(sock, query_message("insert into cap3 values (3, 'split body')"), 20)
            assert (b"C", b"INSERT 0 1\0") in answers, answers
        assert pg_new.psql("select string_agg(id::text, ',' order by id) from cap3") == "1,2,3"
        assert [texts for _, texts in logged(proxy, capture)] == [
            ["insert into cap3 values (2, 'held as 3 bytes at the switch')"],
            ["insert into cap3 values (3, 'split body')"],
        ]
    finally:
        proxy.stop()
        changelog.close()


def _extended_copy(conn: psycopg.Connection[Any], sql: str, rows: bytes) -> psycopg.pq.ExecStatus:
    """COPY FROM STDIN the way libpq sends it through the extended protocol (Parse/Bind/Execute/Sync first).

    libpq is driven non-blocking, sleeping between polls: a blocking libpq call would keep the GIL from
    the in-process proxy's thread.
    """
    pgconn = conn.pgconn

    def flush() -> None:
        while pgconn.flush():
            time.sleep(0.001)

    def result() -> psycopg.pq.abc.PGresult | None:
        deadline = time.monotonic() + 30
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                return pgconn.get_result()
            assert time.monotonic() < deadline, "no answer through the proxy"
            time.sleep(0.001)

    def drain() -> None:
        while result() is not None:
            pass

    pgconn.send_query_params(sql.encode(), None)
    flush()
    first = result()
    assert first is not None
    if first.status != psycopg.pq.ExecStatus.COPY_IN:
        drain()
        return first.status
    pgconn.put_copy_data(rows)
    pgconn.put_copy_end()
    flush()
    final = result()
    assert final is not None
    drain()
    return final.status


@pytest.mark.parametrize("explicit", [False, True], ids=["implicit", "explicit"])
def test_copy_from_stdin_through_the_extended_protocol(capturing: tuple[ProxyThread, Capture], explicit: bool) -> None:
    """libpq's extended COPY (its Sync reaches a server in copy-in mode) is captured, data and all."""
    proxy, capture = capturing
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        if explicit:
            conn.execute("BEGIN")
        status = _extended_copy(conn, "COPY cap (id, v) FROM STDIN", b"1\tone\n2\ttwo\n")
        assert status == psycopg.pq.ExecStatus.COMMAND_OK
        # A COPY that fails before copy-in mode: the Sync is answered normally, the session goes on.
        if explicit:
            conn.execute("COMMIT")
        failed = _extended_copy(conn, "COPY nosuchtable FROM STDIN", b"")
        assert failed == psycopg.pq.ExecStatus.FATAL_ERROR
        conn.execute("INSERT INTO cap (id, v) VALUES (3, 'after')")
        assert conn.execute("SELECT count(*) FROM cap").fetchone() == (3,)
    log = logged(proxy, capture)
    assert [statements for _, statements in log] == [
        ["COPY cap (id, v) FROM STDIN"],
        ["INSERT INTO cap (id, v) VALUES (3, 'after')"],
    ]
    record = capture.changelog.read_committed("app", 0, 1)[0]
    assert record.transaction.statements[0].copy_data == b"1\tone\n2\ttwo\n"
    assert all(txid is not None for txid, _ in log)


def test_copy_from_stdin_in_autocommit_is_held_and_logged_before_its_commit(
    capturing: tuple[ProxyThread, Capture], backend: LabServer
) -> None:
    """An autocommit COPY FROM STDIN (psql's \\copy, psycopg's copy()) is wrapped like any implicit write: its
    data goes through while pgleap's own COMMIT waits for the log; a COPY the server fails ends cleanly."""
    proxy, capture = capturing
    rows = 20_000  # more data than the socket buffers hold: the client's reading must stay on during copy-in
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.cursor().copy("copy cap (id, v) from stdin") as copy:
            for i in range(1, rows + 1):
                copy.write_row((i, "x" * 100))
        with (
            pytest.raises(psycopg.errors.InvalidTextRepresentation),
            conn.cursor().copy("copy cap (id) from stdin") as copy,
        ):
            copy.write(b"not a number\n")
        conn.execute("insert into cap (id, v) values (0, 'after')")
    result = subprocess.run(
        [tool("psql"), proxy.dsn(), "-X", "-q", "-c", "\\copy cap (id, v) from stdin"],
        input="-1\tpsql\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with psycopg.connect(backend.dsn()) as direct:
        assert direct.execute("select count(*) from cap").fetchone() == (rows + 2,)
    log = logged(proxy, capture)
    assert [statements for _, statements in log] == [
        ["copy cap (id, v) from stdin"],
        ["insert into cap (id, v) values (0, 'after')"],
        ["COPY  cap ( id, v ) FROM STDIN"],  # psql's text for \\copy
    ]
    assert all(txid is not None for txid, _ in log)
    assert capture.logged_after_commit == 0  # each durable before its COMMIT, none logged after the answer
    copied = capture.changelog.read_committed("app", 0, 1)[0].transaction.statements[0].copy_data
    assert copied is not None and copied.count(b"\n") == rows


def test_an_autocommit_do_block_is_held_and_logged_with_its_txid_before_11(
    capturing: tuple[ProxyThread, Capture], backend: LabServer
) -> None:
    """A DO block cannot COMMIT inside before 11: capture wraps it like any implicit write, its record durable
    before the COMMIT and with its txid. From 11 it may, so it runs outside a block, logged after its answer."""
    proxy, capture = capturing
    do = "do $$ begin insert into cap (id, v) values ({}, 'do'); end $$"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(do.format(1))  # type: ignore[arg-type]
    result = subprocess.run(
        [tool("psql"), proxy.dsn(), "-X", "-q", "-c", do.format(2)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    with psycopg.connect(backend.dsn()) as direct:
        assert direct.execute("select count(*) from cap").fetchone() == (2,)
    log = logged(proxy, capture)
    assert [statements for _, statements in log] == [[do.format(1)], [do.format(2)]]
    if backend.major < 11:
        assert all(txid is not None for txid, _ in log) and capture.logged_after_commit == 0
    else:
        assert all(txid is None for txid, _ in log) and capture.logged_after_commit == 2


def test_a_notice_raised_at_pgleaps_commit_reaches_the_client_before_the_statements_tag(
    tmp_path: Path, pg_new: LabServer
) -> None:
    """An implicit write commits before its CommandComplete, so a deferred trigger's NOTICE (or ERROR) at that
    commit comes first: through pgleap, whose own COMMIT ends the wrapped statement, in the same order (I2)."""
    schema = (
        "drop table if exists cap4; create table cap4 (id int primary key);"
        "create or replace function cap4_check() returns trigger language plpgsql as $$ begin "
        "raise notice 'checked %', new.id; if new.id < 0 then raise exception 'negative'; end if; return null; end $$;"
        "create constraint trigger cap4_check after insert on cap4 deferrable initially deferred "
        "for each row execute procedure cap4_check()"
    )
    with raw_session(tmp_path, pg_new, schema) as (sock, _, _):
        sock.sendall(query_message("insert into cap4 values (1)"))
        assert [kind for kind, _ in read_until_ready(sock)] == [b"N", b"C", b"Z"]
        sock.sendall(query_message("insert into cap4 values (-1)"))
        assert [kind for kind, _ in read_until_ready(sock)] == [b"N", b"E", b"Z"]
        # A later statement's notice follows the tags before it; only the commit's goes ahead of the last tag.
        sock.sendall(query_message("insert into cap4 values (2); drop table if exists cap4_nosuch"))
        answers = read_until_ready(sock)
        assert [kind for kind, _ in answers] == [b"C", b"N", b"N", b"C", b"Z"]
        assert b"skipping" in answers[1][1] and b"checked 2" in answers[2][1]


def test_an_explicit_simple_transaction_runs_the_probe_once(
    tmp_path: Path, pg_new: LabServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe rides on the first write; the held COMMIT, released with its txid known, goes out alone."""
    from pgleap.upgrade.capture.transaction import TransactionAssembler

    probes: list[int | None] = []
    real_probe = TransactionAssembler.probe

    def counted(self: TransactionAssembler, txid: int | None, *rest: Any) -> None:
        probes.append(txid)
        real_probe(self, txid, *rest)

    monkeypatch.setattr(TransactionAssembler, "probe", counted)
    schema = "drop table if exists cap5; create table cap5 (id int primary key)"
    with raw_session(tmp_path, pg_new, schema) as (sock, proxy, capture):
        for sql in ("begin", "insert into cap5 values (1)", "insert into cap5 values (2)", "commit"):
            sock.sendall(query_message(sql))
            assert read_until_ready(sock)[-2][0] == b"C"
        ((txid, statements),) = logged(proxy, capture)
    assert len(statements) == 2 and probes == [txid]


def test_a_read_only_transaction_with_set_local_and_a_txid_logs_nothing_and_leaves_nothing_pending(
    capturing: tuple[ProxyThread, Capture],
) -> None:
    """SELECT ... FOR UPDATE gets a txid but writes nothing: no record, and the next write is logged as usual."""
    proxy, capture = capturing
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("insert into cap values (1, 0, 'a')")
        conn.commit()
        conn.execute("set local lock_timeout = '1s'")
        conn.execute("select * from cap for update")
        conn.commit()
        conn.execute("insert into cap values (2, 0, 'b')")
        conn.commit()
    assert [statements for _, statements in logged(proxy, capture)] == [
        ["insert into cap values (1, 0, 'a')"],
        ["insert into cap values (2, 0, 'b')"],
    ]
    assert capture.changelog.pending() == []  # drained above: every settle is written


def test_a_set_before_any_write_leaves_the_transaction_without_a_snapshot(
    capturing: tuple[ProxyThread, Capture],
) -> None:
    """No probe goes around a SET before the transaction's first write: its SELECT would take the snapshot,
    and SET TRANSACTION ISOLATION LEVEL after it would fail (I2: nothing injected shows)."""
    proxy, _ = capturing
    with psycopg.connect(proxy.dsn()) as conn:  # the extended protocol, in a transaction block
        conn.execute("set search_path = public")
        conn.execute("set local time zone 'UTC'")
        conn.execute("set transaction isolation level repeatable read")
        assert conn.execute("show transaction_isolation").fetchone() == ("repeatable read",)
        conn.execute("insert into cap values (1, 0, 'a')")
        conn.commit()
    # The simple protocol: one string, then statement by statement.
    script = (
        "begin; set search_path = public; set transaction isolation level serializable; "
        "insert into cap values (2, 0, 'b'); commit;\n"
        "begin;\nset time zone 'UTC';\nset transaction isolation level repeatable read;\nshow transaction_isolation;\n"
        "commit;\n"
    )
    done = subprocess.run(
        [tool("psql"), proxy.dsn(), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "repeatable read" in done.stdout.splitlines()


def test_writes_inside_an_explicit_extended_transaction_are_not_held_at_their_sync(
    capturing: tuple[ProxyThread, Capture], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Sync inside a transaction block commits nothing: it goes on at once; only the COMMIT waits for the log."""
    from pgleap.upgrade.capture.forwarding import CapturingForwarder

    released: list[str | None] = []  # Syncs held for their answers, then let go without logging anything
    real_release = CapturingForwarder._release_stash

    def counted(self: CapturingForwarder, point: str | None) -> None:
        released.append(point)
        real_release(self, point)

    monkeypatch.setattr(CapturingForwarder, "_release_stash", counted)
    proxy, capture = capturing
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.transaction():
            for i in (1, 2, 3):
                conn.execute("insert into cap values (%s, txid_current(), 'explicit extended')", (i,))
        conn.execute("insert into cap values (%s, txid_current(), 'implicit')", (4,))  # its Sync commits: logged
    log = logged(proxy, capture)
    assert [len(statements) for _, statements in log] == [3, 1]
    assert "sync" not in released


def test_a_transaction_pipelined_behind_a_commit_is_probed_before_its_own_commit(
    tmp_path: Path, pg_new: LabServer
) -> None:
    """Queries sent in one write ahead of their answers: the second transaction's txid is learnt at its own
    COMMIT (the answers of the first had not told capture yet), so it is durable before that COMMIT too."""
    schema = "drop table if exists cap6; create table cap6 (id int primary key)"
    with raw_session(tmp_path, pg_new, schema) as (sock, proxy, capture):
        for sql in ("begin", "insert into cap6 values (1)"):
            sock.sendall(query_message(sql))
            read_until_ready(sock)
        pipelined = ("commit", "begin", "insert into cap6 values (2)", "commit")
        sock.sendall(b"".join(query_message(sql) for sql in pipelined))
        answers = [read_until_ready(sock) for _ in pipelined]
        assert [a[-1] for a in answers] == [(b"Z", b"I"), (b"Z", b"T"), (b"Z", b"T"), (b"Z", b"I")]
        log = logged(proxy, capture)
        assert [statements for _, statements in log] == [
            ["insert into cap6 values (1)"],
            ["insert into cap6 values (2)"],
        ]
        assert all(txid is not None for txid, _ in log) and log[0][0] != log[1][0]
        assert capture.logged_after_commit == 0


def test_a_write_pipelined_behind_a_begin_is_left_in_the_clients_transaction(tmp_path: Path, pg_new: LabServer) -> None:
    """BEGIN, a write and ROLLBACK sent before any answer: capture must not take the write for an implicit
    transaction and wrap it in its own BEGIN ... COMMIT, which would warn the client and commit its block."""
    schema = "drop table if exists cap7; create table cap7 (id int primary key)"
    with raw_session(tmp_path, pg_new, schema) as (sock, proxy, capture):
        pipelined = ("begin", "insert into cap7 values (1)", "rollback", "insert into cap7 values (2)")
        sock.sendall(b"".join(query_message(sql) for sql in pipelined))
        answers = [read_until_ready(sock) for _ in pipelined]
        assert [a[-1] for a in answers] == [(b"Z", b"T"), (b"Z", b"T"), (b"Z", b"I"), (b"Z", b"I")]
        assert [kind for answer in answers for kind, _ in answer if kind in (b"N", b"E")] == []  # no warning
        assert pg_new.psql("select string_agg(id::text, ',') from cap7") == "2"
        assert [statements for _, statements in logged(proxy, capture)] == [["insert into cap7 values (2)"]]
        # In a block whose COMMIT is skipped by an error before it, in the same string: the writes after it
        # fail as they would directly, and the client's ROLLBACK ends the block, not pgleap.
        sock.sendall(query_message("begin"))
        read_until_ready(sock)
        pipelined = ("insert into cap7 values (2); commit", "insert into cap7 values (3)", "rollback")
        sock.sendall(b"".join(query_message(sql) for sql in pipelined))
        answers = [read_until_ready(sock) for _ in pipelined]
        assert [a[-1] for a in answers] == [(b"Z", b"E"), (b"Z", b"E"), (b"Z", b"I")]
        assert [kind for answer in answers for kind, _ in answer if kind in (b"N", b"E")] == [b"E", b"E"]
        assert pg_new.psql("select string_agg(id::text, ',') from cap7") == "2"
        # Behind the ROLLBACK of a failed block: the next transaction's write is probed and its COMMIT held
        # (not judged by the failed block); a SET behind a COMMIT does not take the next one's snapshot.
        sock.sendall(query_message("begin"))
        read_until_ready(sock)
        sock.sendall(query_message("insert into cap7 values (2)"))  # a duplicate: the block fails
        read_until_ready(sock)
        pipelined = (
            "rollback",
            "begin",
            "insert into cap7 values (4)",
            "commit",
            "begin",
            "insert into cap7 values (5)",
            "commit",
            "begin",
            "set search_path = public",
            "set transaction isolation level serializable",
            "commit",
        )
        sock.sendall(b"".join(query_message(sql) for sql in pipelined))
        answers = [read_until_ready(sock) for _ in pipelined]
        assert [kind for answer in answers for kind, _ in answer if kind in (b"N", b"E")] == []
        assert pg_new.psql("select string_agg(id::text, ',' order by id) from cap7") == "2,4,5"
        log = logged(proxy, capture)
        assert [statements for _, statements in log][1:] == [
            ["insert into cap7 values (4)"],
            ["insert into cap7 values (5)"],
        ]
        assert all(txid is not None for txid, _ in log) and capture.logged_after_commit == 0


def test_a_rollback_to_savepoint_pipelined_with_the_next_write_has_the_settings_read_again(
    tmp_path: Path, pg_new: LabServer
) -> None:
    """The settings were read inside the savepoint, after a SET it undoes: the record has them as they are."""
    schema = "drop table if exists cap8; create table cap8 (id int primary key)"
    with raw_session(tmp_path, pg_new, schema) as (sock, proxy, capture):
        for sql in ("begin", "savepoint s", "set search_path = elsewhere, public", "insert into cap8 values (1)"):
            sock.sendall(query_message(sql))
            read_until_ready(sock)
        pipelined = ("rollback to savepoint s", "insert into cap8 values (2)", "commit")
        sock.sendall(b"".join(query_message(sql) for sql in pipelined))
        answers = [read_until_ready(sock) for _ in pipelined]
        assert [a[-1] for a in answers] == [(b"Z", b"T"), (b"Z", b"T"), (b"Z", b"I")]
        proxy.call(capture.drain())
        (record,) = capture.changelog.read_committed("app", 0, 10)
        assert [s.sql for s in record.transaction.statements] == ["insert into cap8 values (2)"]
        assert dict(record.transaction.settings)["search_path"] == '"$user", public'


def test_copy_data_sent_before_the_servers_answer_is_captured(tmp_path: Path, pg_new: LabServer) -> None:
    """COPY FROM STDIN and its data in one write, in a block: the data is the statement's from the Query on."""
    schema = "drop table if exists cap9; create table cap9 (id int primary key, v text)"

    def frame(kind: bytes, body: bytes) -> bytes:
        return kind + struct.pack("!I", len(body) + 4) + body

    with raw_session(tmp_path, pg_new, schema) as (sock, proxy, capture):
        sock.sendall(query_message("begin"))
        read_until_ready(sock)
        rows = b"1\tone\n2\ttwo\n"
        sock.sendall(query_message("copy cap9 from stdin") + frame(b"d", rows) + frame(b"c", b""))
        assert read_until_ready(sock)[-1] == (b"Z", b"T")
        sock.sendall(query_message("commit"))
        read_until_ready(sock)
        proxy.call(capture.drain())
        (record,) = capture.changelog.read_committed("app", 0, 10)
        (statement,) = record.transaction.statements
        assert (statement.sql, statement.copy_data, statement.tag) == ("copy cap9 from stdin", rows, "COPY 2")


def test_explicit_transactions_in_one_pipeline_are_each_logged_with_their_txid(
    capturing: tuple[ProxyThread, Capture],
) -> None:
    """libpq's pipeline mode: two explicit transactions sent before any answer, each durable before its COMMIT."""
    proxy, capture = capturing
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.pipeline() as pipeline:
        for i in (1, 2):
            conn.execute("BEGIN")
            conn.execute("insert into cap values (%s, txid_current(), 'pipelined tx')", (i,))
            conn.execute("COMMIT")
        pipeline.sync()
    log = logged(proxy, capture)
    assert [len(statements) for _, statements in log] == [1, 1]
    assert all(txid is not None for txid, _ in log) and log[0][0] != log[1][0]
    assert capture.logged_after_commit == 0


def test_two_phase_commit_is_reported(capturing: tuple[ProxyThread, Capture]) -> None:
    """PREPARE TRANSACTION may be committed from another session, or never: capture says it cannot follow."""
    proxy, capture = capturing
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO cap VALUES (1, 0, 'in a prepared transaction')")
        with pytest.raises(psycopg.Error):  # the lab servers run with max_prepared_transactions = 0
            conn.execute("PREPARE TRANSACTION 'pgleap_test'")
    proxy.call(capture.drain())
    assert any("two-phase commit is not captured" in p.what for p in capture.problems), capture.problems
