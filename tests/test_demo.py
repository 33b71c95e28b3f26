"""The demo: its pure helpers, its config, and one real run of `pgleap demo` end to end (the whole upgrade)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pgleap.config import parse_config
from pgleap.demo import VALIDATION_SECONDS, Cast, demo_config
from pgleap.demo_view import quantile_ms, replication_sql
from pgleap.demo_workload import WorkloadError, parse_pgbench

PGBENCH_OUTPUT = """\
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 5
number of clients: 4
number of threads: 2
duration: 10 s
number of transactions actually processed: 20594
number of failed transactions: 0 (0.000%)
latency average = 1.936 ms
initial connection time = 12.345 ms
tps = 2066.512345 (without initial connection time)
"""

# pgbench 18 with the demo's two scripts, stopped by SIGALRM.
PGBENCH_SCRIPTS_OUTPUT = """\
transaction type: multiple scripts
scaling factor: 1
query mode: simple
number of clients: 2
number of threads: 1
maximum number of tries: 1
duration: 600 s
number of transactions actually processed: 5799
number of failed transactions: 0 (0.000%)
latency average = 1.016 ms
initial connection time = 30.075 ms
tps = 1968.785966 (without initial connection time)
SQL script 1: <builtin: TPC-B (sort of)>
 - weight: 9 (targets 90.0% of total)
 - 5203 transactions (89.7% of total)
 - number of transactions actually processed: 5203 (tps = 1766.441349)
 - number of failed transactions: 0 (0.000%)
SQL script 2: <builtin: select only>
 - weight: 1 (targets 10.0% of total)
 - 596 transactions (10.3% of total)
 - number of transactions actually processed: 596 (tps = 202.344617)
 - number of failed transactions: 0 (0.000%)
"""


def test_parse_pgbench_reads_the_summary() -> None:
    summary = parse_pgbench(PGBENCH_OUTPUT)
    assert (summary.tps, summary.processed, summary.failed, summary.latency_ms) == (2066.512345, 20594, 0, 1.936)
    assert summary.writes == 20594  # one script: every transaction is TPC-B


def test_parse_pgbench_counts_the_tpcb_script_apart() -> None:
    summary = parse_pgbench(PGBENCH_SCRIPTS_OUTPUT)
    assert (summary.processed, summary.writes, summary.failed) == (5799, 5203, 0)


def test_parse_pgbench_refuses_script_counts_that_do_not_add_up() -> None:
    with pytest.raises(WorkloadError, match="do not add up"):
        parse_pgbench(PGBENCH_SCRIPTS_OUTPUT.replace(" - 5203 transactions", " - 5202 transactions"))


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.001, 50.0), (0.002, 100.0), (float("inf"), 100.0)]
    assert quantile_ms(buckets, 0.5) == pytest.approx(1.0)
    assert quantile_ms(buckets, 0.75) == pytest.approx(1.5)
    assert quantile_ms([(float("inf"), 0.0)], 0.5) is None


def test_replication_sql_speaks_each_majors_vocabulary() -> None:
    assert "replay_lsn" in replication_sql(100023) and "pg_wal_lsn_diff" in replication_sql(100023)
    assert "replay_location" in replication_sql(90624) and "pg_xlog_location_diff" in replication_sql(90624)


def test_demo_config_gives_the_machine_target_replica_and_a_short_validation(tmp_path: Path) -> None:
    def server(port: int) -> Any:
        return SimpleNamespace(host="127.0.0.1", port=port, superuser="postgres", password="pw")

    config = parse_config(demo_config(Cast(server(5410), server(5411), server(5418)), tmp_path))
    (upgrade,) = config.upgrades
    assert (upgrade.source.port, upgrade.target and upgrade.target.port, upgrade.replica and upgrade.replica.port) == (
        5410,
        5418,
        5411,
    )
    assert upgrade.replica is not None and upgrade.replica.database == "app"
    assert upgrade.validation.validation_duration == VALIDATION_SECONDS
    assert upgrade.validation.compare_results


@pytest.mark.integration
def test_demo_runs_the_whole_upgrade() -> None:
    # A subprocess, as the README runs it: no stdin, no TTY, and nothing (metrics thread) left in this process.
    env = dict(os.environ, COLUMNS="200")
    result = subprocess.run(
        [sys.executable, "-m", "pgleap.cli.main", "demo", "--seconds", "5"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "\x1b[" not in output, "no terminal: rich must print plain text"
    for shown in ("SHOW UPGRADE STATUS", "SHOW UPGRADE TABLES", "SHOW REPLAY", "blocked_by", "SHOW UPGRADE HISTORY"):
        assert shown in output, f"{shown!r} missing from:\n{output}"
    # Every phase, in order, from the machine's own history as the demo printed it.
    moves = re.findall(r"^phase (\S+) -> (\S+) \(t=", output, re.MULTILINE)
    assert moves == [
        ("-", "initializing"),
        ("initializing", "copying"),
        ("copying", "catching_up"),
        ("catching_up", "mirroring"),
        ("mirroring", "cutover_ready"),
        ("cutover_ready", "cut_over"),
        ("cut_over", "complete"),
    ], output
    assert "public.pgbench_accounts   done" in output, output  # copy progress
    pause = re.search(r"^cutover pause: ([\d.]+) s", output, re.MULTILINE)
    assert pause is not None and float(pause.group(1)) < 1.0, output
    assert re.search(r"^\s*failed transactions\s+0\s*$", output, re.MULTILINE), output
    tps = re.search(r"^\s*tps\s+([\d,.]+)\s*$", output, re.MULTILINE)
    assert tps is not None and float(tps.group(1).replace(",", "")) > 0, output
    assert re.search(r"^\s*tables differing, Charles vs Alice\s+0\s*$", output, re.MULTILINE), output
    assert "equals Alice (PostgreSQL 10), every table row by row: 0 differences" in output, output
    assert re.search(r"0 divergences, 0 apply errors", output), output
