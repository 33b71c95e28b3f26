"""bench/cutover: the pause of repeated cutovers and rollbacks under 64 pgbench clients, and client errors.

One run: a PG 10 source (`pgbench -i -s <scale>`), a fresh PG 18 target, `pgleap run` as its own process
with START UPGRADE (validation_duration 1 s, no read comparison, so the gates open quickly). Once it is
cutover_ready, pgbench TPC-B runs with 64 clients (-M prepared) through pgleap while the bench alternates
INITIATE CUTOVER and ROLLBACK UPGRADE, `--switches` of each, reading every pause from SHOW UPGRADE STATUS.
Then pgbench is stopped and every error it printed is counted; finally the tables are compared.

The last lines are `name: value`, including `max_pause_s` and `client_errors`. Never a test: it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from _common import progress
from pgleap.config import ServerConfig
from pgleap.lab import Lab
from pgleap.lab.binaries import client_tool
from pgleap.testing import ProxyProcess
from pgleap.upgrade.copy.compare import database_differences

ADMIN = {"database": "pgleap", "user": "pgleap_admin", "password": "admin-secret"}
UPGRADE = '[auto_upgrade.validation]\nvalidation_duration = "1s"\ncompare_results = false'
_ERROR = re.compile(r"error|aborted", re.IGNORECASE)
# pgleap's log line for each switch (upgrade/switch.py): where the pause went.
_PAUSE_PARTS = re.compile(r"pause \(draining ([\d.]+)s, asking sessions ([\d.]+)s, catching up ([\d.]+)s")


def first_row(console: psycopg.Connection[Any], command: str) -> dict[str, Any]:
    """An admin command's first row, by column name (values as the console sends them: text)."""
    cur = console.execute(command)
    names = [c.name for c in cur.description or ()]
    return dict(zip(names, cur.fetchone() or (), strict=True))


def status(console: psycopg.Connection[Any]) -> dict[str, Any]:
    """SHOW UPGRADE STATUS's only row."""
    return first_row(console, "SHOW UPGRADE STATUS")


def until(console: psycopg.Connection[Any], phase: str, timeout: float) -> None:
    """Wait for the upgrade's phase."""
    deadline = time.monotonic() + timeout
    while status(console)["phase"] != phase:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {phase} within {timeout:.0f}s: {status(console)}")
        time.sleep(0.2)


def drained(console: psycopg.Connection[Any], timeout: float = 120) -> None:
    """Until every captured write is settled and replayed (the comparison at the end needs it)."""
    deadline = time.monotonic() + timeout
    while True:
        pending = first_row(console, "SHOW CAPTURE")["log_pending"]
        if pending == "0" and first_row(console, "SHOW REPLAY")["lag_transactions"] == "0":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replay did not catch up within {timeout:.0f}s")
        time.sleep(0.2)


def switch(console: psycopg.Connection[Any], command: str, attempts: int = 20) -> float:
    """Run a cutover or rollback (a refused cutover is tried again: a gate may shut for a moment); its pause."""
    for attempt in range(attempts):
        try:
            console.execute(command)
            return float(status(console)["last_pause_s"])
        except psycopg.Error as exc:
            if attempt == attempts - 1:
                raise
            progress(f"{command} refused ({str(exc).strip()}); again")
            time.sleep(0.5)
    raise AssertionError("unreachable")


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=5)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--switches", type=int, default=10, help="cutovers, and as many rollbacks")
    parser.add_argument("--dwell", type=float, default=2.0, help="seconds on each side between switches")
    args = parser.parse_args()
    pgbench = str(client_tool("pgbench"))
    settings = {"max_connections": str(args.clients + 40)}
    with tempfile.TemporaryDirectory(prefix="pgleap-bench-cutover-") as tmp, Lab() as lab:
        source, target = lab.primary(10, settings=settings), lab.target(18, settings=settings)
        source.psql("CREATE DATABASE bench")
        progress(f"pgbench -i -s {args.scale} on PG 10")
        subprocess.run(
            [pgbench, "-i", "-s", str(args.scale), "-q", source.dsn("bench")], check=True, capture_output=True
        )
        src = ServerConfig(source.host, source.port, "bench", source.superuser, source.password)
        dst = ServerConfig(target.host, target.port, "bench", target.superuser, target.password)
        work = Path(tmp)
        extra = f'state_path = "{work / "state.db"}"\nchangelog_path = "{work / "changes.db"}"\ndurability = "batch"'
        pgleap = ProxyProcess(work, {"app": src}, extra=extra, targets={"app": dst}, upgrade_extra=UPGRADE)
        bench: subprocess.Popen[str] | None = None
        cutovers: list[float] = []
        rollbacks: list[float] = []
        try:
            pgleap.wait_accepting()
            with psycopg.connect(pgleap.dsn(**ADMIN), autocommit=True, prepare_threshold=None) as console:
                console.execute("START UPGRADE")
                progress("START UPGRADE; waiting for cutover_ready")
                until(console, "cutover_ready", 600)
                argv = [pgbench, "-n", "-c", str(args.clients), "-j", "2", "-T", "3600", "-M", "prepared", pgleap.dsn()]
                bench = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                time.sleep(args.dwell)
                for i in range(args.switches):
                    until(console, "cutover_ready", 120)
                    cutovers.append(switch(console, "INITIATE CUTOVER"))
                    time.sleep(args.dwell)
                    rollbacks.append(switch(console, "ROLLBACK UPGRADE"))
                    progress(f"switch {i + 1}: cutover {cutovers[-1]:.3f}s, rollback {rollbacks[-1]:.3f}s")
                    time.sleep(args.dwell)
                running = bench.poll() is None
                bench.terminate()
                output, _ = bench.communicate(timeout=60)
                bench = None
                drained(console)
        finally:
            if bench is not None:
                bench.terminate()
                bench.communicate(timeout=60)
            pgleap.stop()
        breakdown = [m.groups() for m in _PAUSE_PARTS.finditer(pgleap.output())]
        errors = [line for line in output.splitlines() if _ERROR.search(line)]
        problems = asyncio.run(database_differences(src, dst))
    pauses = cutovers + rollbacks
    print(f"clients: {args.clients} (pgbench TPC-B -M prepared), pgbench still running at the end: {running}")
    for name, values in (("cutover", cutovers), ("rollback", rollbacks)):
        print(
            f"{name:9} pause: min {min(values):.3f}s  median {statistics.median(values):.3f}s  "
            f"max {max(values):.3f}s  ({len(values)} runs)"
        )
    for i, part in enumerate(("draining", "asking sessions", "catching up")):
        values = [float(b[i]) for b in breakdown]
        if values:
            print(f"  of which {part:15}: median {statistics.median(values):.3f}s  max {max(values):.3f}s")
    for line in errors[:10]:
        print(f"client error: {line}")
    print(f"tables equal at the end: {not problems}" + ("" if not problems else f" ({problems[:3]})"))
    print(f"cutover_pause_median_s: {statistics.median(cutovers):.3f}")
    print(f"rollback_pause_median_s: {statistics.median(rollbacks):.3f}")
    print(f"max_pause_s: {max(pauses):.3f}")
    print(f"client_errors: {len(errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
