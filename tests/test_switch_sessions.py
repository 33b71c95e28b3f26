"""What a session holds on its server decides whether and how it moves at a switch: a temporary table or a
cursor WITH HOLD makes the cutover wait (and, past `session_wait`, refuse, naming the session), a LISTEN
moves with the session at once and keeps hearing notifications, now sent on the target.

PG 10 source, a fresh PG 18 target; the upgrade reaches cutover_ready by itself first.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.protocol.messages import command_complete, data_row, message, ready_for_query, row_description
from pgleap.proxy.session_state import ServerState, ServerStateReader, movable_state
from pgleap.testing import ProxyProcess
from pgleap.upgrade.replay import ApplyJournal

from conftest import console as open_console
from conftest import pgbench_database, server_config, show, wait_for

UPGRADE = (
    '[auto_upgrade.validation]\nvalidation_duration = "2s"\ncompare_results = false\n'
    "[auto_upgrade.sync]\nparallel_workers = 2\n"
    '[auto_upgrade.cutover]\nsession_wait = "3s"'
)
CHANNEL = "pgleap events"  # a space: the LISTEN issued again on the target must quote it


def test_server_state_names_what_cannot_move() -> None:
    """Only temporary tables, held cursors and advisory locks keep a session; LISTEN moves."""
    assert ServerState('LISTEN "a b"', 0, 0, 0).unmovable is None
    assert ServerState(None, 2, 1, 0).unmovable == "2 temporary tables, 1 cursors WITH HOLD"
    assert ServerState(None, 0, 0, 3).unmovable == "3 session advisory locks"


@pytest.fixture
def source_db(pg_old: LabServer) -> Iterator[str]:
    """A small PG 10 pgbench database."""
    yield from pgbench_database(pg_old, "ss", 1)


def port_of(conn: psycopg.Connection[Any]) -> int:
    """The port of the server answering this client connection."""
    row = conn.execute("SELECT current_setting('port')").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.integration
def test_temporary_state_delays_cutover_and_listen_moves(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """A temporary table and a held cursor make INITIATE CUTOVER wait, then refuse after session_wait with
    nothing switched; once dropped while it waits, the cutover goes through; the listening session is on
    the target at once and receives a NOTIFY sent there."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    pgleap = ProxyProcess(tmp_path, {"app": source}, extra=extra, targets={"app": target_config}, upgrade_extra=UPGRADE)
    try:
        pgleap.wait_accepting()
        with (
            open_console(pgleap) as console,
            psycopg.connect(pgleap.dsn(), autocommit=True) as listener,
            psycopg.connect(pgleap.dsn(), autocommit=True) as holder,
            psycopg.connect(pgleap.dsn(), autocommit=True) as sender,
        ):
            console.execute("START UPGRADE")
            wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "cutover_ready", "cutover_ready", 180)
            listener.execute(f'LISTEN "{CHANNEL}"')
            holder.execute("CREATE TEMP TABLE scratch (x int)")
            holder.execute("DECLARE kept CURSOR WITH HOLD FOR SELECT 1")
            sender.execute("SET lock_timeout = '1234ms'")  # not a setting capture's probe reads: asked at the move

            started = time.monotonic()
            with pytest.raises(psycopg.Error, match="1 temporary tables, 1 cursors WITH HOLD") as refused:
                console.execute("INITIATE CUTOVER FORCE")
            waited = time.monotonic() - started
            assert waited >= 3.0, waited  # it waited session_wait before refusing
            assert "nothing was switched" in str(refused.value)
            assert show(console, "SHOW UPGRADE STATUS")[0]["routed_to"] == "source"
            assert port_of(holder) == pg_old.port and port_of(listener) == pg_old.port

            def let_go() -> None:
                time.sleep(1.0)
                holder.execute("CLOSE kept")
                holder.execute("DROP TABLE scratch")

            releaser = threading.Thread(target=let_go)
            started = time.monotonic()
            releaser.start()
            (note,) = console.execute("INITIATE CUTOVER FORCE").fetchall()
            waited = time.monotonic() - started
            releaser.join()
            assert "clients on the target" in note[0], note
            assert 1.0 <= waited < 3.0, waited
            (status,) = show(console, "SHOW UPGRADE STATUS")
            assert status["routed_to"] == "target" and float(status["last_pause_s"]) < 1.0, status

            # The listener sent nothing since the cutover: it moved by itself, its LISTEN with it.
            sender.execute("SELECT pg_notify(%s, 'on the target')", (CHANNEL,))
            assert port_of(sender) == target.port
            assert sender.execute("SHOW lock_timeout").fetchone() == ("1234ms",)
            heard = list(listener.notifies(timeout=10, stop_after=1))
            assert [(n.channel, n.payload) for n in heard] == [(CHANNEL, "on the target")], heard
            assert port_of(listener) == target.port and port_of(holder) == target.port
    finally:
        pgleap.stop()


def test_a_table_that_must_be_re_synced_holds_cutover_until_it_is(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """A table whose transaction replay skipped (skip_and_resync) may lack it on the target: the resync gate
    shuts and cutover is refused naming it; FORCE RESYNC TABLE clears it, and cutover goes."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    upgrade = UPGRADE.replace("parallel_workers = 2", "parallel_workers = 2\nresync_on_error = false")
    pgleap = ProxyProcess(tmp_path, {"app": source}, extra=extra, targets={"app": target_config}, upgrade_extra=upgrade)
    try:
        pgleap.wait_accepting()
        with open_console(pgleap) as console:
            console.execute("START UPGRADE")
            wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "cutover_ready", "cutover_ready", 180)
            journal = ApplyJournal(tmp_path / "changes.journal.db")  # the running pgleap's, as replay writes it
            try:
                journal.mark_resync("app", ("pgbench_branches",), 1, "stands in for a skipped txid", required=True)
            finally:
                journal.close()
            wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "mirroring", "the gate to shut", 30)
            with pytest.raises(psycopg.Error, match=r"resync: 1 tables must be re-synced first .*pgbench_branches"):
                console.execute("INITIATE CUTOVER")
            assert show(console, "SHOW UPGRADE STATUS")[0]["routed_to"] == "source"
            console.execute("FORCE RESYNC TABLE 'pgbench_branches'")
            wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "cutover_ready", "cutover_ready", 60)
            (note,) = console.execute("INITIATE CUTOVER").fetchall()
            assert "clients on the target" in note[0], note
    finally:
        pgleap.stop()


class _Transport:
    """Stands in for the client's transport: what the reader passes on."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def test_server_state_reader_keeps_notifications_for_the_client() -> None:
    """The answer is read across split reads; a NotificationResponse arriving meanwhile goes to the client."""

    async def main() -> tuple[ServerState, bytes]:
        client = _Transport()
        reader = ServerStateReader(client)
        notification = message(ord("A"), struct.pack("!i", 42) + b"chan\0hello\0")
        answer = (
            row_description(["listen", "temp", "cursors", "locks"])
            + notification
            + data_row(['LISTEN "a b"', "1", "0", "2"])
            + command_complete("SELECT 1")
            + ready_for_query()
        )
        for i in range(0, len(answer), 7):  # in pieces, as a socket may deliver it
            reader.data_received(answer[i : i + 7])
        (row,) = await reader.answer
        return ServerState.from_row(row), client.written

    state, forwarded = asyncio.run(main())
    assert state == ServerState('LISTEN "a b"', 1, 0, 2)
    assert forwarded.startswith(b"A") and b"hello" in forwarded


def test_movable_state_reads_statements_and_settings() -> None:
    """MOVABLE_STATE_SQL's rows: protocol-level statements with their parameter types, and SET values."""
    rows: list[list[str | None]] = [
        ["S", "q1", "SELECT $1::int", "{23}"],
        ["S", "", "SELECT 1", "{}"],  # the unnamed statement does not outlive a transaction boundary
        ["G", "lock_timeout", "1234ms", None],
        ["G", "search_path", "app, public", None],
    ]
    statements, settings = movable_state(rows)
    assert statements == [("q1", "SELECT $1::int", (23,))]
    assert settings == [("lock_timeout", "1234ms"), ("search_path", "app, public")]
