"""The demo: its pure helpers, and one real run of `pgleap demo` end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pgleap.demo import _quantile_ms, parse_pgbench, replication_sql

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


def test_parse_pgbench_reads_the_summary() -> None:
    summary = parse_pgbench(PGBENCH_OUTPUT)
    assert (summary.tps, summary.processed, summary.failed, summary.latency_ms) == (2066.512345, 20594, 0, 1.936)


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.001, 50.0), (0.002, 100.0), (float("inf"), 100.0)]
    assert _quantile_ms(buckets, 0.5) == pytest.approx(1.0)
    assert _quantile_ms(buckets, 0.75) == pytest.approx(1.5)
    assert _quantile_ms([(float("inf"), 0.0)], 0.5) is None


def test_replication_sql_speaks_each_majors_vocabulary() -> None:
    assert "replay_lsn" in replication_sql(100023) and "pg_wal_lsn_diff" in replication_sql(100023)
    assert "replay_location" in replication_sql(90624) and "pg_xlog_location_diff" in replication_sql(90624)


@pytest.mark.integration
def test_demo_runs_end_to_end() -> None:
    # A subprocess, as the README runs it: no stdin, no TTY, and nothing (metrics thread) left in this process.
    env = dict(os.environ, COLUMNS="200")
    result = subprocess.run(
        [sys.executable, "-m", "pgleap.cli.main", "demo", "--seconds", "5"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for heading in (
        "SHOW STATS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW VERSION",
        "total_xact_count",
        "pgleap_transactions_total",
        "replay_lag_bytes",
        "failed transactions",
        "START CAPTURE",
        "copy done",
        "SHOW REPLAY",
        "skipped_in_snapshot",
    ):
        assert heading in output, f"{heading!r} missing from:\n{output}"
    tps = re.search(r"^\s*tps\s+([\d,.]+)\s*$", output, re.MULTILINE)
    assert tps is not None and float(tps.group(1).replace(",", "")) > 0, output
    assert re.search(r"^\s*failed transactions\s+0\s*$", output, re.MULTILINE), output
    assert "equals Alice (PostgreSQL 10), every table row by row" in output, output
    assert re.search(r"\b0 divergences, 0 apply errors", output), output
    assert "\x1b[" not in output, "no terminal: rich must print plain text"
