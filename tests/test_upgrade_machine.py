"""START UPGRADE drives a database from capture to cutover_ready by itself, under a live pgbench load, and a
pgleap killed (-9) in a phase goes on from that phase when it restarts, losing nothing.

PG 10 source, a fresh PG 18 target (the copy creates it). `validation_duration = "2s"` and no read
comparison, so the gates can open within a test.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.lab import Lab, LabServer
from pgleap.testing import ProxyProcess
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.gates import GateInputs, cutover_gates, shut
from pgleap.upgrade.phases import Phase, PhaseError, check_move

from conftest import console as open_console
from conftest import pgbench_database, server_config, show, tool, wait_for

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


@pytest.fixture
def source_db(pg_old: LabServer) -> Iterator[str]:
    """A PG 10 database with pgbench's tables at scale 3 (300,000 accounts: the copy takes a few seconds)."""
    yield from pgbench_database(pg_old, "um", 3)


@pytest.fixture
def target(lab: Lab) -> Iterator[LabServer]:
    """A fresh PG 18 target."""
    server = lab.target(18)
    yield server
    server.stop()


def phase_of(console: psycopg.Connection[Any]) -> str | None:
    """SHOW UPGRADE STATUS's phase."""
    (row,) = show(console, "SHOW UPGRADE STATUS")
    return row["phase"]


def pgbench(dsn: str) -> subprocess.Popen[str]:
    """TPC-B through pgleap for long enough; stopped by the test."""
    return subprocess.Popen(
        [tool("pgbench"), "-n", "-c", "4", "-j", "2", "-T", "600", "-M", "simple", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.integration
@pytest.mark.parametrize("kill_in", [None, "copying", "mirroring"], ids=["steady", "kill9-copying", "kill9-mirroring"])
def test_start_upgrade_reaches_cutover_ready(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer, kill_in: str | None
) -> None:
    """initializing → copying → catching_up → mirroring → cutover_ready, with a kill -9 in `kill_in`; equal."""
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
        bench = pgbench(pgleap.dsn())
        time.sleep(1)
        with open_console(pgleap) as console:
            (note,) = console.execute("START UPGRADE").fetchall()
            assert note[0] == "database app: upgrade started"
            if kill_in is not None:
                wait_for(lambda: phase_of(console) == kill_in, f"phase {kill_in}", timeout=120)
        live = pgleap
        if kill_in is not None:
            pgleap.kill()
            bench.wait(60)  # pgbench ends on the lost connections; a new run goes to the new pgleap
            restarted = ProxyProcess(runs[1], {"app": source}, **options)
            restarted.wait_accepting()
            live = restarted
            bench = pgbench(live.dsn())
        with open_console(live) as console:
            wait_for(lambda: phase_of(console) == "cutover_ready", "cutover_ready", timeout=180)
            (status,) = show(console, "SHOW UPGRADE STATUS")
            history = show(console, "SHOW UPGRADE HISTORY")
            assert bench.poll() is None, "pgbench stopped early"
            bench.terminate()
            bench.communicate(timeout=60)
            bench = None
            wait_for(lambda: show(console, "SHOW CAPTURE")[0]["log_pending"] == "0", "nothing pending", 60)
            wait_for(lambda: show(console, "SHOW REPLAY")[0]["lag_transactions"] == "0", "lag 0", 120)
        moves = [(h["from_phase"], h["to_phase"]) for h in history]
        assert moves == [
            (None, "initializing"),
            ("initializing", "copying"),
            ("copying", "catching_up"),
            ("catching_up", "mirroring"),
            ("mirroring", "cutover_ready"),
        ], history
        assert status["blocked_by"] is None and status["tables_verified"] == "4" and status["tables_differing"] == "0"
        if kill_in is not None:
            assert f"resuming the upgrade: database app: upgrade resuming in phase {kill_in}" in live.output()
    finally:
        if bench is not None:
            bench.terminate()
            bench.communicate(timeout=60)
        for process in (pgleap, restarted):
            if process is not None:
                process.stop()
    problems = asyncio.run(database_differences(source, target_config))
    assert not problems, "\n".join(problems)


def count(server: LabServer, dbname: str) -> int:
    """Rows of pgbench_history: one per committed pgbench transaction."""
    return int(server.psql("SELECT count(*) FROM pgbench_history", dbname=dbname))


@pytest.mark.integration
def test_cutover_rollback_cutover_complete_under_pgbench(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """Prepared-statement pgbench goes on through cutover, rollback and cutover again without one error;
    every write ends on both sides (row by row), and each pause is under a second."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    pgleap = ProxyProcess(
        tmp_path, {"app": source}, extra=extra, targets={"app": target_config}, upgrade_extra=f"{VALIDATION}\n{SYNC}"
    )
    bench: subprocess.Popen[str] | None = None
    try:
        pgleap.wait_accepting()
        with open_console(pgleap) as console:
            cli = [sys.executable, "-m", "pgleap.cli.main"]
            where = ["-c", str(pgleap.config), "--port", str(pgleap.port)]
            wide = {**os.environ, "COLUMNS": "200"}
            started = subprocess.run([*cli, "upgrade", "start", *where], capture_output=True, text=True, env=wide)
            assert started.returncode == 0 and "database app: upgrade started" in started.stdout, started
            early = subprocess.run([*cli, "upgrade", "cutover", *where], capture_output=True, text=True, env=wide)
            assert early.returncode == 2 and "cutover refused: the upgrade is" in early.stdout, early
            wait_for(lambda: phase_of(console) == "cutover_ready", "cutover_ready", timeout=180)
            shown = subprocess.run([*cli, "status", *where], capture_output=True, text=True, env=wide)
            assert shown.returncode == 0 and "cutover_ready" in shown.stdout and "routed_to" in shown.stdout, shown
            bench = subprocess.Popen(
                [tool("pgbench"), "-n", "-c", "8", "-j", "2", "-T", "60", "-M", "prepared", pgleap.dsn()],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(3)
            pauses = []
            for command, routed in [("INITIATE CUTOVER", "target"), ("ROLLBACK UPGRADE", "source")] * 2:
                if command == "INITIATE CUTOVER":
                    wait_for(lambda: phase_of(console) == "cutover_ready", "cutover_ready again", timeout=60)
                before = (count(pg_old, source_db), count(target, source_db))
                console.execute(command)
                (status,) = show(console, "SHOW UPGRADE STATUS")
                assert status["routed_to"] == routed, status
                pauses.append(float(status["last_pause_s"]))
                time.sleep(3)
                after = (count(pg_old, source_db), count(target, source_db))
                # Writes land on the side clients are routed to, and replay carries them to the other side.
                assert after[0] > before[0] and after[1] > before[1], (command, before, after)
            assert bench.poll() is None, "pgbench ended before the last switch"
            out, _ = bench.communicate(timeout=120)
            bench_rc, bench = bench.returncode, None
            assert bench_rc == 0, out
            assert "number of failed transactions: 0" in out, out
            assert max(pauses) < 1.0, pauses
            wait_for(lambda: phase_of(console) == "cutover_ready", "cutover_ready for the last time", timeout=60)
            console.execute("INITIATE CUTOVER")
            console.execute("COMPLETE UPGRADE")
            assert phase_of(console) == "complete"
            moves = [(h["from_phase"], h["to_phase"]) for h in show(console, "SHOW UPGRADE HISTORY")]
            assert (
                moves[-6:]
                == [
                    ("cutover_ready", "cut_over"),
                    ("cut_over", "mirroring"),
                    ("mirroring", "cutover_ready"),
                    ("cutover_ready", "cut_over"),
                    ("cut_over", "complete"),
                ][-6:]
                or moves
            ), moves
    finally:
        if bench is not None:
            bench.terminate()
            bench.communicate(timeout=60)
        pgleap.stop()
    problems = asyncio.run(database_differences(source, target_config))
    assert not problems, "\n".join(problems)


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
            wait_for(lambda: phase_of(console) == "cutover_ready", "cutover_ready", timeout=180)
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
