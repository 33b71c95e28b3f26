"""START UPGRADE drives a database from capture to cutover_ready by itself, under a live pgbench load; a pgleap
killed (-9) in any phase goes on from that phase when it restarts, losing nothing; the bar's end-to-end run
under 32 pgbench clients (cutover, rollback, cutover, complete).

PG 10 source, a fresh PG 18 target (the copy creates it). `validation_duration = "2s"` and no read
comparison, so the gates can open within a test.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.tasks import cancel_until_done
from pgleap.testing import ProxyProcess
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.gates import GateInputs, cutover_gates, shut
from pgleap.upgrade.phases import Phase, PhaseError, check_move

from conftest import ReconnectingWriters, pgbench_database, server_config, show, tool, wait_for
from conftest import console as open_console

VALIDATION = '[auto_upgrade.validation]\nvalidation_duration = "2s"\ncompare_results = false'
SYNC = "[auto_upgrade.sync]\nparallel_workers = 2"


def test_phase_moves() -> None:
    """Forward one phase at a time; back from cutover_ready to mirroring; rolled_back from all but the end."""
    check_move(None, Phase.INITIALIZING)
    check_move(Phase.COPYING, Phase.CATCHING_UP)
    check_move(Phase.CUTOVER_READY, Phase.MIRRORING)
    check_move(Phase.MIRRORING, Phase.ROLLED_BACK)
    with pytest.raises(PhaseError, match="copying cannot move to mirroring"):
        check_move(Phase.COPYING, Phase.MIRRORING)
    with pytest.raises(PhaseError, match="complete cannot move to rolled_back"):
        check_move(Phase.COMPLETE, Phase.ROLLED_BACK)
    with pytest.raises(PhaseError, match="not started cannot move to copying"):
        check_move(None, Phase.COPYING)


def test_gates_name_what_holds_cutover_back() -> None:
    """Each gate shut says why; all open when lag, verification, duration and error rate allow."""
    ready = GateInputs(10, 5, 0.001, 0.0, True, 3, 0, 0.2, 1.0)
    assert not shut(cutover_gates(ready))
    blocked = GateInputs(1, 5, 0.001, 0.01, True, 3, 1, None, 1.0)
    assert {g.name: g.detail for g in shut(cutover_gates(blocked))} == {
        "replay_lag": "replay is not running",
        "verification": "1 of 3 tables differ",
        "validation_duration": "mirroring for 1s of 5s",
        "error_rate": "error rate 1.0000% (threshold 0.1000%)",
    }
    assert "error_rate" not in {g.name for g in cutover_gates(GateInputs(10, 5, 0.001, None, False, 3, 0, 0.2, 1.0))}
    waiting = GateInputs(10, 5, 0.001, 0.0, True, 3, 0, 0.2, 1.0, must_resync=("public.orders",))
    (gate,) = shut(cutover_gates(waiting))
    assert gate.name == "resync" and gate.detail.startswith("1 tables must be re-synced first")
    assert "public.orders" in gate.detail


@pytest.fixture
def source_db(pg_old: LabServer) -> Iterator[str]:
    """A PG 10 database with pgbench's tables at scale 3 (300,000 accounts: the copy takes a few seconds)."""
    yield from pgbench_database(pg_old, "um", 3)


def phase_of(console: psycopg.Connection[Any]) -> str | None:
    """SHOW UPGRADE STATUS's phase."""
    (row,) = show(console, "SHOW UPGRADE STATUS")
    return row["phase"]


def wait_phase(console: psycopg.Connection[Any], phases: str | tuple[str, ...], timeout: float) -> None:
    """Until the upgrade is in one of `phases`; the failure shows SHOW UPGRADE STATUS (what blocks it)."""
    wanted = (phases,) if isinstance(phases, str) else phases
    deadline = time.monotonic() + timeout
    while (status := show(console, "SHOW UPGRADE STATUS")[0])["phase"] not in wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"not {' or '.join(wanted)} after {timeout}s: {status}")
        time.sleep(0.1)


def pgbench(dsn: str, clients: int = 4, seconds: int = 600, mode: str = "simple") -> subprocess.Popen[str]:
    """TPC-B through pgleap for `seconds` (the default: until the test stops it)."""
    return subprocess.Popen(
        [tool("pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", mode, dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(bench: subprocess.Popen[str], timeout: float = 120) -> int:
    """Wait for a pgbench run ending by its -T: it must end cleanly, with no failed transaction; the number of
    transactions it committed (each wrote one pgbench_history row)."""
    out, _ = bench.communicate(timeout=timeout)
    assert bench.returncode == 0, out
    assert "number of failed transactions: 0" in out, out
    match = re.search(r"number of transactions actually processed: (\d+)", out)
    assert match is not None, out
    return int(match.group(1))


# A write that is fast on the PG 10 source and takes SLOW_ON_TARGET seconds to replay on the PG 18 target (a
# statement the new major runs slower, say): logged during the copy, it holds the upgrade in catching_up.
SLOW_ON_TARGET = 5
SLOW_WRITE = (
    "UPDATE pgbench_accounts SET filler = filler WHERE aid = 1 AND (SELECT 1 FROM pg_sleep(CASE WHEN "
    f"current_setting('server_version_num')::int >= 180000 THEN {SLOW_ON_TARGET} ELSE 0 END)) = 1"
)
# Catching up ends once the oldest unreplayed write is under CATCH_UP_LAG (1 s) old: the slow write must be
# older than that when the copy ends, so the copy must outlast it. On a fast day scale 3 copies in 1 s.
BALLAST = (
    "CREATE TABLE ballast AS SELECT g AS id, repeat('x', 100) AS pad FROM generate_series(1, 2000000) g;"
    "ALTER TABLE ballast ADD PRIMARY KEY (id)"
)
RESTART_PHASES = ["initializing", "copying", "catching_up", "mirroring", "cutover_ready"]
MOVES_TO_CUTOVER_READY = [
    (None, "initializing"),
    ("initializing", "copying"),
    ("copying", "catching_up"),
    ("catching_up", "mirroring"),
    ("mirroring", "cutover_ready"),
]


def hold_in_catching_up(live: ProxyProcess, console: psycopg.Connection[Any]) -> None:
    """While copying: a write that takes SLOW_ON_TARGET seconds to replay, so catching_up lasts that long."""
    # It must commit after S (the copy records its table plan after S) to be replayed rather than copied.
    wait_for(lambda: show(console, "SHOW UPGRADE TABLES"), "the copy's table plan (S taken)", timeout=120)
    with psycopg.connect(live.dsn(), autocommit=True) as app:
        app.execute(SLOW_WRITE)


@pytest.mark.integration
@pytest.mark.parametrize("kill_in", RESTART_PHASES)
def test_kill9_in_a_phase_goes_on_from_it(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer, kill_in: str
) -> None:
    """Under pgbench, pgleap killed (-9) in `kill_in` and started again: it resumes in that phase and reaches
    cutover_ready (from cutover_ready: cut_over) with every phase passed once; source and target are equal."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    options: dict[str, Any] = {
        "extra": extra,
        "targets": {"app": target_config},
        "upgrade_extra": f"{VALIDATION}\n{SYNC}",
    }
    runs = [tmp_path / "one", tmp_path / "two"]
    for run in runs:
        run.mkdir()
    pgleap = ProxyProcess(runs[0], {"app": source}, **options)
    restarted: ProxyProcess | None = None
    bench: subprocess.Popen[str] | None = None
    held: psycopg.Connection[Any] | None = None
    try:
        if kill_in == "catching_up":
            pg_old.psql(BALLAST, dbname=source_db)
        pgleap.wait_accepting()
        bench = pgbench(pgleap.dsn())
        if kill_in == "initializing":
            # A session in an open transaction: capture cannot start in it, and the copy's S waits for it.
            held = psycopg.connect(pgleap.dsn())
            held.execute("SELECT 1")
        time.sleep(1)
        with open_console(pgleap) as console:
            (note,) = console.execute("START UPGRADE").fetchall()
            assert note[0] == "database app: upgrade started"
            if kill_in == "catching_up":
                hold_in_catching_up(pgleap, console)
            wait_phase(console, kill_in, 120)
            if kill_in == "initializing":
                time.sleep(1)
                (status,) = show(console, "SHOW UPGRADE STATUS")
                assert status["phase"] == "initializing", status
                assert status["activity"] == "waiting for every session to capture", status
            if kill_in == "catching_up":
                time.sleep(1)
                assert phase_of(console) == "catching_up"  # the slow write holds replay for SLOW_ON_TARGET s
        pgleap.kill()
        bench.wait(60)  # pgbench ends on the lost connections; a new run goes to the new pgleap
        if held is not None:
            held.close()  # its transaction died with pgleap: nothing of it was committed
        restarted = ProxyProcess(runs[1], {"app": source}, **options)
        restarted.wait_accepting()
        bench = pgbench(restarted.dsn())
        with open_console(restarted) as console:
            wait_phase(console, "cutover_ready", 180)
            if kill_in == "cutover_ready":
                # Once verification has run again, the gates hold with no fall back to mirroring (the validation
                # clock survives the restart), and the cutover goes through.
                wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["tables_verified"] == "4", "verified", 60)
                console.execute("INITIATE CUTOVER")
            (status,) = show(console, "SHOW UPGRADE STATUS")
            history = show(console, "SHOW UPGRADE HISTORY")
            assert bench.poll() is None, "pgbench stopped early"
            bench.terminate()
            bench.communicate(timeout=60)
            bench = None
            wait_for(lambda: show(console, "SHOW CAPTURE")[0]["log_pending"] == "0", "nothing pending", 60)
            if kill_in == "cutover_ready":
                # The reverse log carries the writes made on the target to the source.
                wait_for(lambda: not asyncio.run(database_differences(source, target_config)), "equal", 60)
            else:
                wait_for(lambda: show(console, "SHOW REPLAY")[0]["lag_transactions"] == "0", "lag 0", 120)
        moves = [(h["from_phase"], h["to_phase"]) for h in history]
        if kill_in == "cutover_ready":
            assert moves == [*MOVES_TO_CUTOVER_READY, ("cutover_ready", "cut_over")], history
            assert status["phase"] == "cut_over" and status["routed_to"] == "target", status
        else:
            assert moves == MOVES_TO_CUTOVER_READY, history
            tables = 5 if kill_in == "catching_up" else 4  # pgbench's, and the ballast
            assert status["blocked_by"] is None and status["tables_verified"] == str(tables), status
            assert status["tables_differing"] == "0", status
        assert f"resuming the upgrade: database app: upgrade resuming in phase {kill_in}" in restarted.output()
    finally:
        if held is not None:
            held.close()
        if bench is not None:
            bench.terminate()
            bench.communicate(timeout=60)
        for process in (pgleap, restarted):
            if process is not None:
                process.stop()
    problems = asyncio.run(database_differences(source, target_config))
    assert not problems, "\n".join(problems)


def count(server: LabServer, dbname: str, table: str = "pgbench_history") -> int:
    """Rows of `table` (of pgbench_history: one per committed pgbench transaction)."""
    return int(server.psql(f"SELECT count(*) FROM {table}", dbname=dbname))


def tpcb_consistent(server: LabServer, dbname: str) -> None:
    """TPC-B's invariant: every balance is the sum of the history's deltas (no transaction half there)."""
    sums = server.psql(
        "SELECT (SELECT sum(delta) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts), "
        "(SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches)",
        dbname=dbname,
    )
    assert len(set(sums.split("|"))) == 1, sums


@pytest.mark.integration
def test_pg10_to_18_under_32_pgbench_clients_cutover_rollback_cutover_complete(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """The bar of issue 6 literally: 32 `-M prepared` pgbench clients through start, cutover_ready, cutover,
    30 s on the target, rollback, running on the source, cutover again and complete, without one client
    error; after the rollback the source equals the target row by row, and at the end the target holds every
    transaction pgbench committed; every pause is under a second."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    pgleap = ProxyProcess(
        tmp_path, {"app": source}, extra=extra, targets={"app": target_config}, upgrade_extra=f"{VALIDATION}\n{SYNC}"
    )
    bench: subprocess.Popen[str] | None = None
    committed = 0
    pauses: list[float] = []

    def switch(console: psycopg.Connection[Any], command: str, routed: str) -> None:
        before = (count(pg_old, source_db), count(target, source_db))
        console.execute(command)
        (status,) = show(console, "SHOW UPGRADE STATUS")
        assert status["routed_to"] == routed, status
        pauses.append(float(status["last_pause_s"]))
        time.sleep(3)
        after = (count(pg_old, source_db), count(target, source_db))
        # Writes land on the side clients are routed to, and replay carries them to the other side.
        assert after[0] > before[0] and after[1] > before[1], (command, before, after)
        assert bench is not None and bench.poll() is None, f"pgbench ended before {command} was done"

    try:
        pgleap.wait_accepting()
        with open_console(pgleap) as console:
            cli = [sys.executable, "-m", "pgleap.cli.main"]
            where = ["-c", str(pgleap.config), "--port", str(pgleap.port)]
            wide = {**os.environ, "COLUMNS": "200"}
            # Start: capture, copy and catch-up under the 32 clients, their statements prepared before capture.
            bench = pgbench(pgleap.dsn(), 32, 20, "prepared")
            time.sleep(2)
            started = subprocess.run([*cli, "upgrade", "start", *where], capture_output=True, text=True, env=wide)
            assert started.returncode == 0 and "database app: upgrade started" in started.stdout, started
            early = subprocess.run([*cli, "upgrade", "cutover", *where], capture_output=True, text=True, env=wide)
            assert early.returncode == 2 and "cutover refused: the upgrade is" in early.stdout, early
            wait_phase(console, ("mirroring", "cutover_ready"), 180)
            committed += finished(bench)
            wait_phase(console, "cutover_ready", 120)
            shown = subprocess.run([*cli, "status", *where], capture_output=True, text=True, env=wide)
            assert shown.returncode == 0 and "cutover_ready" in shown.stdout and "routed_to" in shown.stdout, shown
            # Cut over, 30 s on the target, roll back, a few seconds on the source: the run ends by its -T.
            bench = pgbench(pgleap.dsn(), 32, 45, "prepared")
            time.sleep(3)
            switch(console, "INITIATE CUTOVER", "target")
            time.sleep(27)
            switch(console, "ROLLBACK UPGRADE", "source")
            committed += finished(bench)
            bench = None
            wait_for(lambda: show(console, "SHOW CAPTURE")[0]["log_pending"] == "0", "nothing pending", 60)
            wait_for(lambda: show(console, "SHOW REPLAY")[0]["lag_transactions"] == "0", "lag 0", 120)
            # Every write is on the source after the rollback, including those made on the target.
            problems = asyncio.run(database_differences(source, target_config))
            assert not problems, "\n".join(problems)
            assert count(pg_old, source_db) == committed
            # Cut over again under the clients and complete while they run.
            wait_phase(console, "cutover_ready", 60)
            bench = pgbench(pgleap.dsn(), 32, 15, "prepared")
            time.sleep(3)
            switch(console, "INITIATE CUTOVER", "target")
            console.execute("COMPLETE UPGRADE")
            assert phase_of(console) == "complete"
            committed += finished(bench)
            bench = None
            moves = [(h["from_phase"], h["to_phase"]) for h in show(console, "SHOW UPGRADE HISTORY")]
    finally:
        if bench is not None:
            bench.terminate()
            bench.communicate(timeout=60)
        pgleap.stop()
    print(f"32 clients: {committed} transactions committed, 0 failed; pauses {pauses}")
    assert moves == [
        *MOVES_TO_CUTOVER_READY,
        ("cutover_ready", "cut_over"),
        ("cut_over", "mirroring"),
        ("mirroring", "cutover_ready"),
        ("cutover_ready", "cut_over"),
        ("cut_over", "complete"),
    ], moves
    assert max(pauses) < 1.0, pauses
    # At the end the target holds every committed transaction, whole.
    assert count(target, source_db) == committed
    tpcb_consistent(target, source_db)


@pytest.mark.integration
def test_kill9_while_cut_over_keeps_clients_on_the_target_and_the_way_back_open(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """Killed while cut over: the restarted pgleap routes to the target, logs and replays the reverse log, and
    ROLLBACK UPGRADE still brings every write back to the source."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    options: dict[str, Any] = {
        "extra": extra,
        "targets": {"app": target_config},
        "upgrade_extra": f"{VALIDATION}\n{SYNC}",
    }
    runs = [tmp_path / "one", tmp_path / "two"]
    for run in runs:
        run.mkdir()
    pgleap = ProxyProcess(runs[0], {"app": source}, **options)
    restarted: ProxyProcess | None = None
    bench: subprocess.Popen[str] | None = None
    try:
        pgleap.wait_accepting()
        with open_console(pgleap) as console:
            console.execute("START UPGRADE")
            wait_phase(console, "cutover_ready", 180)
            bench = pgbench(pgleap.dsn())
            time.sleep(2)
            console.execute("INITIATE CUTOVER")
        time.sleep(2)
        pgleap.kill()
        bench.wait(60)
        restarted = ProxyProcess(runs[1], {"app": source}, **options)
        restarted.wait_accepting()
        assert "routed to its target" in restarted.output()
        with psycopg.connect(restarted.dsn(), autocommit=True) as app:
            # Straight to the target: the port of the server answering is the target's.
            assert app.execute("SELECT current_setting('port')").fetchone() == (str(target.port),)
        before = count(pg_old, source_db)
        bench = pgbench(restarted.dsn())
        with open_console(restarted) as console:
            (status,) = show(console, "SHOW UPGRADE STATUS")
            assert status["phase"] == "cut_over" and status["routed_to"] == "target", status
            time.sleep(3)
            # The reverse log reaches the source while clients write on the target.
            wait_for(lambda: count(pg_old, source_db) > before, "the reverse log to reach the source", 60)
            console.execute("ROLLBACK UPGRADE")
            (status,) = show(console, "SHOW UPGRADE STATUS")
            assert status["routed_to"] == "source" and status["phase"] == "mirroring", status
            time.sleep(2)
            bench.terminate()
            bench.communicate(timeout=60)
            bench = None
            wait_for(lambda: show(console, "SHOW CAPTURE")[0]["log_pending"] == "0", "nothing pending", 60)
            wait_for(lambda: show(console, "SHOW REPLAY")[0]["lag_transactions"] == "0", "lag 0", 120)
    finally:
        if bench is not None:
            bench.terminate()
            bench.communicate(timeout=60)
        for process in (pgleap, restarted):
            if process is not None:
                process.stop()
    problems = asyncio.run(database_differences(source, target_config))
    assert not problems, "\n".join(problems)


LEDGER = "CREATE TABLE ledger (worker int, n int, PRIMARY KEY (worker, n))"


def ledger_writer(acked: list[tuple[int, int]]) -> Any:
    """One unit of ReconnectingWriters: a row per transaction, noted in `acked` once its COMMIT is answered."""

    def one(conn: psycopg.Connection[Any], worker: int, i: int) -> bool:
        conn.execute("INSERT INTO ledger VALUES (%s, %s)", (worker, i))
        conn.commit()
        acked.append((worker, i))
        time.sleep(0.01)
        return True

    return one


def ledger(server: LabServer, dbname: str) -> set[tuple[int, int]]:
    """The (worker, n) rows of the ledger."""
    out = server.psql("SELECT worker, n FROM ledger", dbname=dbname)
    return {(int(w), int(n)) for w, n in (line.split("|") for line in out.splitlines() if line)}


@pytest.mark.integration
@pytest.mark.parametrize("end", ["complete", "rolled_back"])
def test_kill9_in_an_end_state_keeps_it(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer, end: str
) -> None:
    """Killed (-9) after COMPLETE UPGRADE, or after ROLLBACK UPGRADE before cutover, while clients write: the
    restarted pgleap reports the same phase, routes to the target (complete) or the source (rolled_back),
    captures and replays nothing, and every write a client saw committed is on that server."""
    pg_old.psql(LEDGER, dbname=source_db)
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    options: dict[str, Any] = {
        "extra": extra,
        "targets": {"app": target_config},
        "upgrade_extra": f"{VALIDATION}\n{SYNC}",
    }
    runs = [tmp_path / "one", tmp_path / "two"]
    for run in runs:
        run.mkdir()
    pgleap = ProxyProcess(runs[0], {"app": source}, **options)
    restarted: ProxyProcess | None = None
    acked: list[tuple[int, int]] = []
    writers = ReconnectingWriters(pgleap.dsn(), 4, ledger_writer(acked))
    home, home_port = (target, target.port) if end == "complete" else (pg_old, pg_old.port)
    try:
        pgleap.wait_accepting()
        writers.start()
        with open_console(pgleap) as console:
            console.execute("START UPGRADE")
            wait_phase(console, "cutover_ready", 180)
            if end == "complete":
                console.execute("INITIATE CUTOVER")
                time.sleep(1)
                console.execute("COMPLETE UPGRADE")
            else:
                console.execute("ROLLBACK UPGRADE")
            assert phase_of(console) == end
        time.sleep(1)
        pgleap.kill()  # the writers reconnect, and are refused until the restart
        restarted = ProxyProcess(runs[1], {"app": source}, **options)
        restarted.wait_accepting()
        before = len(acked)
        writers.dsn = restarted.dsn()
        wait_for(lambda: len(acked) > before + 20, "writes through the restarted pgleap", 60)
        with open_console(restarted) as console:
            (status,) = show(console, "SHOW UPGRADE STATUS")
            assert status["phase"] == end and status["routed_to"] == ("target" if end == "complete" else "source")
            assert status["capturing"] == "f" and status["replaying"] == "f", status
            if end == "complete":
                with pytest.raises(psycopg.Error, match="the upgrade is complete; nothing to start"):
                    console.execute("START UPGRADE")
        with psycopg.connect(restarted.dsn(), autocommit=True) as app:
            assert app.execute("SELECT current_setting('port')").fetchone() == (str(home_port),)
        writers.join()
        assert not writers.errors, writers.errors
        assert "resuming the upgrade" not in restarted.output()
    finally:
        writers.join()
        for process in (pgleap, restarted):
            if process is not None:
                process.stop()
    missing = set(acked) - ledger(home, source_db)
    assert not missing, f"{len(missing)} committed writes missing on the {end} side, e.g. {sorted(missing)[:5]}"
    assert writers.reconnects >= 4  # every writer lived through the kill


@pytest.mark.integration
def test_statements_prepared_before_capture_are_captured(tmp_path: Path, pg_old: LabServer, source_db: str) -> None:
    """pgbench -M prepared, connected before capture starts (START UPGRADE's first step): nothing it does from
    then on is reported unreplayable, nothing stays pending in the log. (A session's first Bind after capture
    started used to be decoded before the answer to its pg_prepared_statements load.)"""
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    pgleap = ProxyProcess(tmp_path, {"app": server_config(pg_old, source_db)}, extra=extra)
    bench: subprocess.Popen[str] | None = None
    try:
        pgleap.wait_accepting()
        bench = pgbench(pgleap.dsn(), 8, 6, "prepared")
        time.sleep(2)  # every client has prepared its statements
        with open_console(pgleap) as console:
            console.execute("START CAPTURE")
            finished(bench)
            bench = None
            time.sleep(1)
            (row,) = show(console, "SHOW CAPTURE")
    finally:
        if bench is not None:
            bench.terminate()
            bench.communicate(timeout=60)
        pgleap.stop()
    assert int(row["transactions"]) > 0, row
    assert row["unreplayable"] == "0" and row["log_pending"] == "0", row


def test_a_drive_that_swallows_a_cancellation_is_still_stopped() -> None:
    """stop() cancels again until the drive task has ended, even when a cancellation is lost inside it."""

    async def main() -> tuple[int, float]:
        lost = 0

        async def drive() -> None:
            nonlocal lost
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if lost:
                        raise
                    lost += 1  # the first cancellation is swallowed, as a buggy await inside the drive would

        task = asyncio.get_running_loop().create_task(drive())
        await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(cancel_until_done(task, 0.1), 5)
        assert task.cancelled()
        return lost, time.monotonic() - started

    lost, seconds = asyncio.run(main())
    assert lost == 1 and seconds < 2, (lost, seconds)


def test_the_switch_refuses_the_target_while_replay_requires_re_syncs_but_never_the_way_back() -> None:
    """Checked before the pause and in it: to the target only when forced; back to the source always (logged)."""
    from types import SimpleNamespace

    from pgleap.upgrade.replay import ApplyJournal
    from pgleap.upgrade.switch import SwitchAbortedError, _check_resyncs

    journal = ApplyJournal()
    proxy = SimpleNamespace(replay=SimpleNamespace(journal=journal))
    _check_resyncs(proxy, "app", "target", False, "source")  # type: ignore[arg-type]  # nothing flagged
    journal.mark_resync("app", ("public.t",), 3, "may differ: triggers")
    _check_resyncs(proxy, "app", "target", False, "source")  # type: ignore[arg-type]
    journal.mark_resync("app", ("public.t",), 4, "txid 9 skipped", required=True)
    with pytest.raises(SwitchAbortedError, match=r"re-synced before clients move \(public.t\).*nothing was switched"):
        _check_resyncs(proxy, "app", "target", False, "source")  # type: ignore[arg-type]
    _check_resyncs(proxy, "app", "target", True, "source")  # type: ignore[arg-type]  # forced
    journal.mark_resync("app@reverse", ("public.u",), 2, "txid 12 skipped", required=True)
    _check_resyncs(proxy, "app@reverse", "source", False, "target")  # type: ignore[arg-type]  # the way back
