"""The demo's workload: pgbench through pgleap, started before the upgrade and stopped after the cutover.

pgbench runs TPC-B with a tenth of single-row reads in autocommit (`select-only`): result comparison
samples those on the source as they run, so the error_rate gate has compared reads within seconds of
mirroring, whichever way reads inside write transactions are compared. It runs with a long
`-T` and is stopped with SIGALRM, the signal its own -T timer uses: it then finishes like a timed run,
summary included, at a moment the demo chooses (after the cutover), which SIGTERM or SIGINT would not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from pgleap.lab import client_tool

if TYPE_CHECKING:
    import psycopg

HOST = "127.0.0.1"
PGBENCH_SCALE = 5
PGBENCH_CLIENTS = 4
# One thread: pgbench's per-script counts are shared by its threads without a lock, and with -j 2 they lost
# an update now and then (script counts summing to one less than the total), which the history check needs.
PGBENCH_THREADS = 1
SCRIPTS = ("tpcb-like@9", "select-only@1")
MAX_SECONDS = 3600  # -T: an upper bound only; the demo stops pgbench well before
STOP_TIMEOUT = 60.0  # seconds pgbench may take to finish its transactions and print its summary


class WorkloadError(Exception):
    """pgbench failed or reported failures."""


@dataclass
class PgbenchSummary:
    """The numbers pgbench prints at the end of a run."""

    tps: float
    processed: int
    failed: int
    latency_ms: float | None
    writes: int  # transactions of the TPC-B script: each leaves one pgbench_history row
    output: str


def pgbench_argv(port: int, user: str, database: str, *options: str) -> list[str]:
    """pgbench's command line against pgleap on `port` (the password comes from PGPASSWORD)."""
    return [str(client_tool("pgbench")), *options, "-h", HOST, "-p", str(port), "-U", user, database]


def pgbench_env(password: str) -> dict[str, str]:
    """The environment pgbench gets: the password through PGPASSWORD, never on the command line."""
    env = dict(os.environ)
    env.update(PGPASSWORD=password, PGCONNECT_TIMEOUT="10")
    return env


def pgbench_init(port: int, user: str, password: str, database: str) -> None:
    """pgbench -i through pgleap (DDL, COPY, VACUUM: all through the proxy)."""
    result = subprocess.run(
        pgbench_argv(port, user, database, "-i", "-s", str(PGBENCH_SCALE)),
        env=pgbench_env(password),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise WorkloadError(
            f"pgbench -i through pgleap exited {result.returncode}:\n{tail(result.stdout + result.stderr)}"
        )


class Workload:
    """pgbench running through pgleap in the background until stop()."""

    def __init__(self, port: int, user: str, password: str, database: str) -> None:
        self.options = (
            "-c",
            str(PGBENCH_CLIENTS),
            "-j",
            str(PGBENCH_THREADS),
            *(arg for script in SCRIPTS for arg in ("-b", script)),
            "-T",
            str(MAX_SECONDS),
        )
        self._argv = pgbench_argv(port, user, database, *self.options)
        self._env = pgbench_env(password)
        self._output: IO[str] | None = None
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start pgbench; its output goes to a file, never a pipe nobody reads while the demo polls."""
        self._output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - outlives this call; close() closes it
        self._process = subprocess.Popen(
            self._argv,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def check_running(self) -> None:
        """Fail, with pgbench's output, if it has exited (an error ends a pgbench client, then the run)."""
        assert self._process is not None
        if self._process.poll() is not None:
            raise WorkloadError(
                f"pgbench exited {self._process.returncode} while the upgrade ran:\n{tail(self._read())}"
            )

    def stop(self) -> PgbenchSummary:
        """End the run as its -T timer would, and return its summary; fail unless it was clean."""
        assert self._process is not None
        self.check_running()
        self._process.send_signal(signal.SIGALRM)
        try:
            self._process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise WorkloadError(f"pgbench did not finish within {STOP_TIMEOUT:.0f}s of being stopped") from exc
        text = self._read()
        if self._process.returncode != 0:
            raise WorkloadError(f"pgbench exited {self._process.returncode}:\n{tail(text)}")
        summary = parse_pgbench(text)
        if summary.failed:
            raise WorkloadError(f"pgbench reported {summary.failed} failed transactions:\n{tail(text)}")
        if summary.tps <= 0:
            raise WorkloadError(f"pgbench reported no throughput:\n{tail(text)}")
        return summary

    def close(self) -> None:
        """Terminate pgbench if it still runs (an error or Ctrl-C), reap it, drop its output."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._output is not None:
            self._output.close()
            self._output = None

    def _read(self) -> str:
        assert self._output is not None
        self._output.seek(0)
        return self._output.read()


_TPS = re.compile(r"^tps = ([\d.]+)", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.MULTILINE)
# With several scripts, each has its own block; the TPC-B one's count is what pgbench_history must hold.
_SCRIPT = re.compile(r"^SQL script \d+: <builtin: ([^>\n]*)>\n(?: - [^\n]*\n)*? - (\d+) transactions", re.MULTILINE)


def parse_pgbench(output: str) -> PgbenchSummary:
    """The summary numbers of a pgbench run's output."""
    tps, processed = _TPS.search(output), _PROCESSED.search(output)
    if tps is None or processed is None:
        raise WorkloadError(f"could not read pgbench's summary:\n{tail(output)}")
    failed, latency = _FAILED.search(output), _LATENCY.search(output)
    total = int(processed.group(1))
    scripts = {name: int(count) for name, count in _SCRIPT.findall(output)}
    if scripts and sum(scripts.values()) != total:
        raise WorkloadError(f"pgbench's per-script counts {scripts} do not add up to its total {total}")
    writes = next((n for name, n in scripts.items() if name.startswith("TPC-B")), 0) if scripts else total
    return PgbenchSummary(
        tps=float(tps.group(1)),
        processed=total,
        failed=int(failed.group(1)) if failed else 0,  # pgbench < 15 has no such line: failures abort the run
        latency_ms=float(latency.group(1)) if latency else None,
        writes=writes,  # one script (no per-script block): every transaction is TPC-B
        output=output,
    )


def check_history(app: psycopg.Connection[Any], summary: PgbenchSummary) -> int:
    """Fail unless every TPC-B transaction pgbench counted left its pgbench_history row."""
    row = app.execute("SELECT count(*) FROM pgbench_history").fetchone()
    history = int(row[0]) if row else 0
    if history != summary.writes:
        raise WorkloadError(
            f"pgbench counted {summary.writes} TPC-B transactions but pgbench_history has {history} rows"
        )
    return history


def tail(text: str, lines: int = 20) -> str:
    """The last lines of a program's output, for error messages."""
    return "\n".join(text.strip().splitlines()[-lines:])
