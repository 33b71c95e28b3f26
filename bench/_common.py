"""Helpers shared by the benchmarks in bench/: child processes, CPU counters, pgbench runs and their numbers.

Nothing here asserts on time: benchmarks measure and print, they never pass or fail on speed.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

LOCALHOST = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not run (a process did not start, pgbench failed)."""


def progress(message: str) -> None:
    """A timestamped progress line on stderr, so stdout ends with the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a text file, or a placeholder when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


# -- child processes ---------------------------------------------------------------------


class ChildProcess:
    """A long-running child (a proxy) in its own session, stopped by its pid; usable as a context manager."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.user = user
        self.env = dict(env) if env is not None else None
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's pid (it is the program itself: no shell, no runuser in between)."""
        if self._popen is None:
            raise BenchError(f"{self.name} was not started")
        return self._popen.pid

    def start(self) -> ChildProcess:
        """Start the child with stdout and stderr going to its log file."""
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                user=self.user,
                group=self.user,
                extra_groups=[] if self.user else None,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it in order
            )
        return self

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self._popen is not None and self._popen.poll() is None

    def wait_listening(self, port: int, timeout: float = 30.0) -> None:
        """Return once the child accepts TCP connections on 127.0.0.1:port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited before listening:\n{tail(self.log_path)}")
            try:
                with socket.create_connection((LOCALHOST, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"{self.name} did not listen on port {port} within {timeout:g}s:\n{tail(self.log_path)}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the child has used so far (from /proc/<pid>/stat)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM by pid, then SIGKILL if it has not exited within `timeout`."""
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        os.kill(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait(10)

    def __enter__(self) -> ChildProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- host CPU ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCpu:
    """A snapshot of /proc/stat's aggregate CPU line (in clock ticks)."""

    busy: int
    total: int

    @classmethod
    def read(cls) -> HostCpu:
        """Read the current counters."""
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values[:8])  # guest time is already counted in user
        return cls(busy=total - idle, total=total)

    def busy_percent_since(self, earlier: HostCpu) -> float:
        """Share of all CPUs' time that was busy between `earlier` and this snapshot."""
        total = self.total - earlier.total
        return 100.0 * (self.busy - earlier.busy) / total if total > 0 else 0.0


# -- pgbench -----------------------------------------------------------------------------

_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


@dataclass
class PgbenchRun:
    """What one pgbench run reported, plus each transaction's latency from its --log files."""

    tps: float
    transactions: int
    latency_avg_ms: float
    failed: int = 0
    latencies_us: list[int] = field(default_factory=list)


def parse_pgbench_output(text: str) -> PgbenchRun:
    """The numbers of pgbench's summary (raises BenchError when they are missing)."""
    tps, latency, processed = _TPS.search(text), _LATENCY.search(text), _PROCESSED.search(text)
    if tps is None or processed is None:
        raise BenchError(f"pgbench printed no result:\n{text[-2000:]}")
    failed = _FAILED.search(text)
    return PgbenchRun(
        tps=float(tps.group(1)),
        transactions=int(processed.group(1)),
        latency_avg_ms=float(latency.group(1)) if latency else float("nan"),
        failed=int(failed.group(1)) if failed else 0,
    )


def read_latency_logs(prefix: Path) -> list[int]:
    """Per-transaction latencies (µs) from pgbench --log files `<prefix>.<pid>[.<thread>]`, which are removed."""
    latencies: list[int] = []
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        with path.open() as handle:
            for line in handle:
                parts = line.split(maxsplit=3)
                if len(parts) > 2 and parts[2].isdigit():  # "failed"/"skipped" rows carry no latency
                    latencies.append(int(parts[2]))
        path.unlink()
    return latencies


def run_pgbench(argv: Sequence[str], env: Mapping[str, str], log_prefix: Path, timeout: float) -> PgbenchRun:
    """Run pgbench with --log under `log_prefix`; its summary plus every transaction's latency."""
    command = [*argv, "--log", f"--log-prefix={log_prefix}"]
    try:
        result = subprocess.run(
            command,
            env={**os.environ, **env, "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"pgbench did not finish within {timeout:g}s: {' '.join(command)}") from exc
    if result.returncode != 0:
        read_latency_logs(log_prefix)  # clean up partial logs
        raise BenchError(
            f"pgbench failed (exit {result.returncode}): {' '.join(command)}\n"
            f"{(result.stderr or result.stdout)[-3000:]}"
        )
    run = parse_pgbench_output(result.stdout + "\n" + result.stderr)
    run.latencies_us = read_latency_logs(log_prefix)
    return run


# -- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of `values` (NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(fraction * len(ordered))  # 1-based
    return float(ordered[max(0, min(len(ordered), rank) - 1)])


def median(values: Iterable[float]) -> float:
    """The median, NaN for no values."""
    items = list(values)
    return statistics.median(items) if items else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 or NaN."""
    return numerator / denominator if denominator and denominator == denominator else float("nan")


# -- timed commands (bench/copy_bench.py) --------------------------------------------------------


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt (even when SIGINT was inherited as ignored, as
    for `cmd &` in a script), so that `finally` blocks and context managers stop what was started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def proc_self_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process itself (not its children), from /proc/<pid>/stat; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def children_cpu_seconds() -> float:
    """User + system CPU time of every child (and their waited-for descendants) this process has reaped."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class TimedRun:
    """What one timed command did: exit code, wall seconds, its output, and the CPU it used."""

    argv: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    self_cpu_seconds: float  # the command's own process, sampled from /proc while it ran
    tree_cpu_seconds: float  # the command and every descendant it waited for (getrusage)


def _stop_group(popen: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group we started (its id is the child's pid), then SIGKILL."""
    if popen.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            popen.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_timed(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> TimedRun:
    """Run a command in its own process group and time it; stopped (by its group id) on timeout, Ctrl-C or error.

    stdout and stderr go to temporary files (or `log_path` + .out/.err), so a chatty tool never blocks on a pipe.
    """
    import tempfile

    command = [str(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        out_path = log_path.with_suffix(".out") if log_path else Path(tmp) / "out"
        err_path = log_path.with_suffix(".err") if log_path else Path(tmp) / "err"
        cpu_before = children_cpu_seconds()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.monotonic()
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
            self_cpu = 0.0
            try:
                deadline = started + timeout
                while popen.poll() is None:
                    sample = proc_self_cpu_seconds(popen.pid)
                    if sample is not None:
                        self_cpu = sample
                    if time.monotonic() > deadline:
                        raise BenchError(f"{command[0]} did not finish within {timeout:g}s: {' '.join(command)}")
                    time.sleep(0.05)
            except BaseException:
                _stop_group(popen)
                raise
            seconds = time.monotonic() - started
        tree_cpu = children_cpu_seconds() - cpu_before
        return TimedRun(
            command,
            popen.returncode,
            seconds,
            out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"),
            self_cpu,
            tree_cpu,
        )


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process, of its reaped children (cutime/cstime) and of its live children: for a postmaster,
    all the CPU its backends used, including backends that already exited. 0.0 when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if child[1] == str(pid):  # ppid (field 4)
            total += int(child[11]) + int(child[12])
    return total / _CLOCK_TICKS
