"""bench/mirror.py: what capture and replay cost the application, how far replay lags, how fast it drains a backlog.

    .venv/bin/python bench/mirror.py [--seconds 20] [--rounds 3] [--clients 8] [--scale 10]
                                     [--backlog-transactions 100000]
    .venv/bin/python bench/mirror.py --quick

A PostgreSQL 10 source gets `pgbench -i -s <scale>`; `pgleap run` (its own process) fronts it with a
PostgreSQL 18 target. As the product runs an upgrade, the bench turns capture on (START CAPTURE), copies
the database (`pgleap copy`, which records the snapshot S) and starts replay (START REPLAY). Then, in one run:

1. TPS of pgbench TPC-B (`-c 8 -j 2`) through pgleap with capture and replay off, with both on, and directly
   on the source; `--rounds` slices of `--seconds` per cell, the cell order rotating from round to round.
2. Replay lag from SHOW REPLAY, sampled every `--sample-interval` seconds during the capture-on slices.
3. A backlog: with replay stopped, the workload commits `--backlog-transactions` (its TPS is the write
   rate); then START REPLAY, timed until SHOW REPLAY shows no lag: the apply rate, and its ratio to the
   write rate.

The last lines printed are `name: value`, one per figure, among them `ratio_capture_on_off_tps`,
`replay_lag_p99_s` and `ratio_apply_backlog_write_rate`.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import pgleap
from _common import (
    LOCALHOST,
    BenchError,
    ChildProcess,
    HostCpu,
    PgbenchRun,
    free_port,
    median,
    percentile,
    process_tree_cpu_seconds,
    progress,
    ratio,
    run_pgbench,
    run_timed,
    stop_on_signals,
)
from pgleap.lab import Lab, LabServer, client_tool

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATABASE = "bench"
PGLEAP_USER = ("bench", "bench-secret")
PGLEAP_ADMIN = ("bench_admin", "bench-admin-secret")
CELLS = ("capture_off", "capture_on", "direct")
LABELS = {
    "capture_off": "pgleap, capture off",
    "capture_on": "pgleap, capture + replay on",
    "direct": "direct to the source",
}
_START_ATTEMPTS = 3
_BACKLOG_TIMEOUT = 3600  # seconds the workload may take to commit the backlog's transactions
_CATCH_UP_TIMEOUT = 600.0  # seconds replay may take to drain; beyond it the figure is n/a and the report says why


# -- command line ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The command line."""

    seconds: int
    rounds: int
    clients: int
    jobs: int
    scale: int
    mode: str
    source_major: int
    target_major: int
    durability: str
    batch_interval: str
    bypass_check_interval: str
    log_dir: Path | None
    backlog_transactions: int
    sample_interval: float
    warmup: int
    direct: bool
    cprofile: bool
    quick: bool

    @property
    def cells(self) -> tuple[str, ...]:
        """The cells measured, in their first round's order."""
        return CELLS if self.direct else CELLS[:2]


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Read the command line; --quick shrinks every duration for a smoke run."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=20, help="pgbench -T of one slice")
    parser.add_argument("--rounds", type=int, default=3, help="slices per cell, the cell order rotating")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s")
    parser.add_argument("--mode", choices=("simple", "extended", "prepared"), default="simple", help="pgbench -M")
    parser.add_argument("--source-major", type=int, default=10, help="PostgreSQL major of the source")
    parser.add_argument("--target-major", type=int, default=18, help="PostgreSQL major of the target")
    parser.add_argument(
        "--durability", choices=("commit", "batch"), default="commit", help="the change log's durability mode"
    )
    parser.add_argument("--batch-interval", default="5ms", help="batch_interval (durability = batch)")
    parser.add_argument(
        "--bypass-check-interval", default="5s", help="bypass_check_interval (how often capture polls the source)"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="directory for the change log (default: the bench's temporary directory under /tmp); "
        "e.g. /dev/shm to take the disk's fsync out of the figures",
    )
    parser.add_argument(
        "--backlog-transactions",
        type=int,
        default=100_000,
        help="transactions the workload commits to build the backlog (replay stopped), in all clients",
    )
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between SHOW REPLAY samples")
    parser.add_argument("--warmup", type=int, default=5, help="unreported TPC-B seconds, capture off then on")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct-to-the-source cell")
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="run pgleap under cProfile (slows it: figures are not comparable); "
        "writes bench/results/mirror-pgleap.prof and prints the top functions",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: scale 2, 1 round of 3 s, a backlog of 2,000, 1 s warm-up"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.rounds, args.seconds, args.backlog_transactions, args.warmup = 2, 1, 3, 2000, 1
    if min(args.seconds, args.rounds, args.clients, args.jobs, args.scale, args.backlog_transactions) < 1:
        parser.error("--seconds, --rounds, --clients, --jobs, --scale and --backlog-transactions must be positive")
    if args.sample_interval <= 0:
        parser.error("--sample-interval must be positive")
    return Settings(
        seconds=args.seconds,
        rounds=args.rounds,
        clients=args.clients,
        jobs=args.jobs,
        scale=args.scale,
        mode=args.mode,
        source_major=args.source_major,
        target_major=args.target_major,
        durability=args.durability,
        batch_interval=args.batch_interval,
        bypass_check_interval=args.bypass_check_interval,
        log_dir=args.log_dir,
        backlog_transactions=args.backlog_transactions,
        sample_interval=args.sample_interval,
        warmup=args.warmup,
        direct=not args.no_direct,
        cprofile=args.cprofile,
        quick=args.quick,
    )


# -- servers -------------------------------------------------------------------------------


def server_settings(clients: int) -> dict[str, str]:
    """Both servers: the data set cached, no checkpoint during a run, and no autovacuum waking up at random in
    one cell and not another (the bench vacuums pgbench's small hot tables itself before every slice)."""
    return {
        "shared_buffers": "256MB",
        "max_connections": str(max(100, 2 * clients + 20)),
        "max_wal_size": "4GB",
        "checkpoint_timeout": "30min",
        "autovacuum": "off",
    }


def libpq_env(server: LabServer) -> dict[str, str]:
    """Environment for a client program talking to a lab server directly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=server.password, LC_ALL="C", PGCONNECT_TIMEOUT="10")
    return env


def initialise_pgbench(source: LabServer, scale: int, workdir: Path) -> None:
    """The bench database and pgbench -i -s <scale> in it, directly on the source (before capture: the copy
    moves it to the target)."""
    source.psql(f"CREATE DATABASE {DATABASE}")
    progress(f"pgbench -i -s {scale} on {source.name} (port {source.port}) ...")
    run = run_timed(
        [
            client_tool("pgbench"),
            "-i",
            "-q",
            "-s",
            str(scale),
            "-h",
            LOCALHOST,
            "-p",
            str(source.port),
            "-U",
            source.superuser,
            DATABASE,
        ],
        env=libpq_env(source),
        timeout=1800,
        log_path=workdir / "pgbench-init",
    )
    if run.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{run.stderr[-3000:]}")


def vacuum_hot_tables(*servers: LabServer) -> None:
    """What pgbench does before a run, done directly on each server: through pgleap, VACUUM and TRUNCATE would
    be captured and replayed. One psql per statement, as VACUUM refuses a multi-statement query (and PG 10
    one VACUUM of several tables)."""
    for server in servers:
        for table in ("pgbench_branches", "pgbench_tellers"):
            server.psql(f"VACUUM {table}", DATABASE)


def server_cpu(server: LabServer) -> float:
    """CPU seconds a server's postmaster and every backend (live or exited) have used so far."""
    pid = server.pid()
    return process_tree_cpu_seconds(pid) if pid is not None else 0.0


# -- pgleap ----------------------------------------------------------------------------------


def toml_string(value: str | Path) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))


def pgleap_config(
    settings: Settings, source: LabServer, target: LabServer, port: int, workdir: Path, log_dir: Path
) -> str:
    """pgleap.toml: one client user, the lab superusers as server logins, the state store in `workdir` and the
    change log in `log_dir` (its fsyncs are on every COMMIT's path, so its filesystem matters)."""
    lines = [
        "[pgleap]",
        f"listen_addr = {toml_string(LOCALHOST)}",
        f"listen_port = {port}",
        f"admin_user = {toml_string(PGLEAP_ADMIN[0])}",
        f"admin_password = {toml_string(PGLEAP_ADMIN[1])}",
        f"state_path = {toml_string(workdir / 'pgleap-state.db')}",
        f"changelog_path = {toml_string(log_dir / 'pgleap-changes.db')}",
        f"durability = {toml_string(settings.durability)}",
        f"batch_interval = {toml_string(settings.batch_interval)}",
        f"bypass_check_interval = {toml_string(settings.bypass_check_interval)}",
        "",
        "[[users]]",
        f"name = {toml_string(PGLEAP_USER[0])}",
        f"password = {toml_string(PGLEAP_USER[1])}",
        'auth_method = "scram-sha-256"',
        "",
        "[[auto_upgrade]]",
        f"database = {toml_string(DATABASE)}",
    ]
    for prefix, server in (("source", source), ("target", target)):
        lines += [
            f"{prefix}_host = {toml_string(server.host)}",
            f"{prefix}_port = {server.port}",
            f"{prefix}_database = {toml_string(DATABASE)}",
            f"{prefix}_user = {toml_string(server.superuser)}",
            f"{prefix}_password = {toml_string(server.password)}",
        ]
    lines += ["", "[auto_upgrade.sync]", f"parallel_workers = {settings.jobs}", ""]
    return "\n".join(lines)


def pgleap_executable() -> Path:
    """The `pgleap` console script of the running venv."""
    path = Path(sys.executable).parent / "pgleap"
    if not path.exists():
        raise BenchError(f"{path} not found; install pgleap into the venv (pip install -e .)")
    return path


def start_pgleap(
    settings: Settings, source: LabServer, target: LabServer, workdir: Path, stack: contextlib.ExitStack
) -> tuple[ChildProcess, int]:
    """`pgleap run` as its own process (its own CPU, as in production), retried on another port if one is taken."""
    config = workdir / "pgleap.toml"
    log_dir = workdir
    if settings.log_dir is not None:  # a fresh directory there, removed on the way out
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgleap-mirror-", dir=settings.log_dir)))
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_port()
        config.write_text(pgleap_config(settings, source, target, port, workdir, log_dir))
        if settings.cprofile:
            # python -m cProfile writes its file when pgleap returns from a graceful (SIGTERM) shutdown.
            RESULTS_DIR.mkdir(exist_ok=True)
            argv = [sys.executable, "-m", "cProfile", "-o", str(RESULTS_DIR / "mirror-pgleap.prof")]
            argv += ["-m", "pgleap.cli.main"]
        else:
            argv = [str(pgleap_executable())]
        argv += ["run", "-c", str(config), "--log-level", "WARNING"]
        process = stack.enter_context(ChildProcess("pgleap", argv, workdir / "pgleap.log"))
        try:
            process.wait_listening(port)
        except BenchError:
            process.stop()
            if attempt == _START_ATTEMPTS:
                raise
            continue
        progress(f"pgleap (pid {process.pid}) listening on {LOCALHOST}:{port}")
        return process, port
    raise AssertionError("unreachable")


_CONSOLE_MAX_AGE = 45.0  # seconds; pgleap drops admin sessions after 60 s (see reconnect_if_old)


class Console:
    """A connection to pgleap's admin console (simple queries only, as the console takes)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = self._connect()
        self.connected_at = time.monotonic()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=LOCALHOST,
            port=self.port,
            dbname="pgleap",
            user=PGLEAP_ADMIN[0],
            password=PGLEAP_ADMIN[1],
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=10,
        )

    def reconnect_if_old(self) -> None:
        """pgleap serves an admin session inside its 60 s login timeout (proxy/session.py, `Session.run`), so
        a console connection is cut after 60 s with "timeout expired while logging in": connect again before."""
        if time.monotonic() - self.connected_at > _CONSOLE_MAX_AGE:
            self.conn.close()
            self.conn = self._connect()
            self.connected_at = time.monotonic()

    def rows(self, command: str) -> list[dict[str, Any]]:
        """The command's rows as dicts by column name."""
        self.reconnect_if_old()
        cur = self.conn.execute(command)
        if cur.description is None:
            return []
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def notes(self, command: str) -> list[str]:
        """A START/STOP command's notes; a refusal becomes a BenchError naming the command."""
        try:
            return [str(next(iter(row.values()))) for row in self.rows(command)]
        except psycopg.Error as exc:
            raise BenchError(f"{command} failed: {exc}") from exc

    def commit_hold(self) -> tuple[int, float]:
        """SHOW CAPTURE's held COMMITs for the bench database: how many, and their wait in seconds in all."""
        for row in self.rows("SHOW CAPTURE"):
            if row["database"] == DATABASE:
                held = int(row["commits_held"])
                return held, held * _number(row["commit_hold_avg_ms"]) / 1000.0 if held else 0.0
        raise BenchError(f"SHOW CAPTURE has no row for database {DATABASE}")

    def replay(self) -> ReplaySample:
        """SHOW REPLAY's row for the bench database, now."""
        for row in self.rows("SHOW REPLAY"):
            if row["database"] == DATABASE:
                return ReplaySample.from_row(time.monotonic(), row)
        raise BenchError(f"SHOW REPLAY has no row for database {DATABASE}")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def _number(value: Any) -> float:
    """A console cell as a number (the console answers in text; NULL is NaN)."""
    return float("nan") if value is None else float(value)


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("t", "true")


@dataclass(frozen=True)
class ReplaySample:
    """One SHOW REPLAY row, with when it was read."""

    at: float  # time.monotonic()
    running: bool
    connected: bool
    lag_transactions: int
    lag_bytes: int
    lag_seconds: float
    apply_rate: float
    applied: int
    divergences: int
    apply_errors: int
    paused_error: str | None
    stopped_error: str | None

    @classmethod
    def from_row(cls, at: float, row: dict[str, Any]) -> ReplaySample:
        """Parse the console's text cells."""
        lag_tx, lag_bytes = _number(row["lag_transactions"]), _number(row["lag_bytes"])
        return cls(
            at=at,
            running=_flag(row["running"]),
            connected=_flag(row["connected"]),
            lag_transactions=-1 if math.isnan(lag_tx) else int(lag_tx),
            lag_bytes=-1 if math.isnan(lag_bytes) else int(lag_bytes),
            lag_seconds=_number(row["lag_seconds"]),
            apply_rate=_number(row["apply_rate"]),
            applied=int(_number(row["applied"]) if row["applied"] is not None else 0),
            divergences=int(_number(row["divergences"]) if row["divergences"] is not None else 0),
            apply_errors=int(_number(row["apply_errors"]) if row["apply_errors"] is not None else 0),
            paused_error=row["paused_error"],
            stopped_error=row["stopped_error"],
        )

    def trouble(self) -> str | None:
        """Why replay will not catch up by itself (paused on an error, or stopped on one), if it will not."""
        return self.paused_error or self.stopped_error


class LagSampler:
    """SHOW REPLAY every `interval` seconds from a thread of its own (with its own connection) while pgbench runs."""

    def __init__(self, port: int, interval: float) -> None:
        self.port = port
        self.interval = interval
        self.samples: list[ReplaySample] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)

    def _run(self) -> None:
        try:
            console = Console(self.port)
            try:
                next_at = time.monotonic()
                while not self._stop.is_set():
                    self.samples.append(console.replay())
                    next_at += self.interval  # a fixed cadence: a slow answer does not stretch the grid
                    self._stop.wait(max(0.0, next_at - time.monotonic()))
            finally:
                console.close()
        except BaseException as exc:  # re-raised by stop() in the main thread
            self.error = exc

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None and exc[0] is None:
            raise BenchError(f"SHOW REPLAY sampling failed: {self.error}") from self.error


def wait_replay(
    console: Console, done: Callable[[ReplaySample], bool], what: str, timeout: float, poll: float = 0.05
) -> ReplaySample:
    """Poll SHOW REPLAY until `done`; BenchError when replay is stuck on an error or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        sample = console.replay()
        if done(sample):
            return sample
        if sample.trouble():
            raise BenchError(f"waiting for {what}: replay cannot go on: {sample.trouble()}")
        if time.monotonic() > deadline:
            raise BenchError(f"waiting for {what}: not done after {timeout:g}s; last SHOW REPLAY: {sample}")
        time.sleep(poll)


def caught_up(sample: ReplaySample) -> bool:
    """Replay is connected and has nothing left to apply."""
    return sample.connected and sample.lag_transactions == 0


def set_mirroring(console: Console, on: bool) -> None:
    """Capture and replay both on (an upgrade running) or both off (before it starts), as in production.

    On: replay waits until connected and caught up, so that no sample of the slice sees the moment after
    START REPLAY when the new replayer has not read the target's position yet. Off: replay first drains what
    the previous slice left, so its work is not done during the next slice."""
    if on:
        console.notes("START CAPTURE")
        console.notes("START REPLAY")
        wait_replay(console, caught_up, "replay to connect", timeout=_CATCH_UP_TIMEOUT)
    else:
        if console.replay().running:
            wait_replay(console, caught_up, "replay to catch up", timeout=_CATCH_UP_TIMEOUT)
            console.notes("STOP REPLAY")
        console.notes("STOP CAPTURE")


def run_copy(settings: Settings, workdir: Path) -> tuple[float, str]:
    """`pgleap copy` into the (absent) target database; records S in the state store. Wall seconds and its report."""
    progress("pgleap copy (after START CAPTURE, as the product does) ...")
    run = run_timed(
        [
            pgleap_executable(),
            "copy",
            "-c",
            workdir / "pgleap.toml",
            "--no-progress",
            "--workers",
            str(settings.jobs),
        ],
        env={**os.environ, "LC_ALL": "C"},
        timeout=3600,
        log_path=workdir / "pgleap-copy",
    )
    if run.returncode != 0:
        raise BenchError(f"pgleap copy failed (exit {run.returncode}):\n{(run.stderr + run.stdout)[-3000:]}")
    return run.seconds, run.stdout.strip()


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Cell:
    """All slices of one cell, with the CPU each process group used while pgbench ran."""

    name: str
    runs: list[PgbenchRun] = field(default_factory=list)
    wall_seconds: float = 0.0
    pgleap_cpu: float = 0.0
    source_cpu: float = 0.0
    target_cpu: float = 0.0
    host_busy: list[float] = field(default_factory=list)
    lag: list[ReplaySample] = field(default_factory=list)
    catch_up_seconds: list[float] = field(default_factory=list)  # after each slice: pgbench's end to lag 0
    commits_held: int = 0  # COMMITs that waited for their change-log record (SHOW CAPTURE), over every slice
    commit_hold_seconds: float = 0.0  # and how long they waited in all

    @property
    def commit_hold_mean_ms(self) -> float:
        """How long a COMMIT waited for its record on average: what capture adds to each COMMIT."""
        return 1000.0 * self.commit_hold_seconds / self.commits_held if self.commits_held else float("nan")

    @property
    def tps(self) -> float:
        """Median TPS of the slices."""
        return median(run.tps for run in self.runs)

    @property
    def transactions(self) -> int:
        """Transactions of every slice."""
        return sum(run.transactions for run in self.runs)

    @property
    def spread_percent(self) -> float:
        """(max - min) / median of the slices' TPS: how noisy the cell was."""
        values = [run.tps for run in self.runs]
        return 100.0 * (max(values) - min(values)) / self.tps if len(values) > 1 and self.tps else 0.0

    def latency_ms(self, fraction: float) -> float:
        """A percentile of every logged transaction's latency over every slice."""
        return percentile([v for run in self.runs for v in run.latencies_us], fraction) / 1000.0

    def cpu_percent(self, seconds: float) -> float:
        """CPU seconds as a share of one core over the cell's wall time."""
        return 100.0 * seconds / self.wall_seconds if self.wall_seconds else float("nan")

    def us_per_transaction(self, seconds: float) -> float:
        """CPU microseconds per transaction."""
        return 1e6 * seconds / self.transactions if self.transactions else float("nan")


@dataclass
class Rig:
    """What the measuring steps drive."""

    settings: Settings
    source: LabServer
    target: LabServer
    pgleap: ChildProcess
    port: int
    console: Console
    workdir: Path

    def pgbench(self, seconds: int, cell: str, transactions: int | None = None) -> list[str]:
        """pgbench TPC-B against pgleap or (cell "direct") the source itself; -n: the bench vacuums itself.

        `seconds` long (-T), or until the clients have committed `transactions` between them (-t per client).
        """
        if cell == "direct":
            where = ["-h", LOCALHOST, "-p", str(self.source.port), "-U", self.source.superuser]
        else:
            where = ["-h", LOCALHOST, "-p", str(self.port), "-U", PGLEAP_USER[0]]
        s = self.settings
        return [
            str(client_tool("pgbench")),
            *where,
            "-n",
            "-c",
            str(s.clients),
            "-j",
            str(s.jobs),
            "-M",
            s.mode,
            *(["-T", str(seconds)] if transactions is None else ["-t", str(-(-transactions // s.clients))]),
            DATABASE,
        ]

    def password(self, cell: str) -> str:
        """pgbench's password for `cell`."""
        return self.source.password if cell == "direct" else PGLEAP_USER[1]

    def run(self, seconds: int, cell: str, transactions: int | None = None) -> PgbenchRun:
        """One pgbench run (`transactions`: run until that many, allowing `seconds` for them)."""
        return run_pgbench(
            self.pgbench(seconds, cell, transactions),
            {"PGPASSWORD": self.password(cell)},
            self.workdir / "pgbench_log",
            timeout=seconds + 300,
        )


def measure_slice(rig: Rig, cell: Cell) -> PgbenchRun:
    """One slice of `cell`: mirroring switched to match, hot tables vacuumed, pgbench run, CPU read around it."""
    on = cell.name == "capture_on"
    set_mirroring(rig.console, on)
    vacuum_hot_tables(rig.source, rig.target)
    held_before = rig.console.commit_hold() if on else (0, 0.0)
    before = (rig.pgleap.cpu_seconds(), server_cpu(rig.source), server_cpu(rig.target), HostCpu.read())
    started = time.monotonic()
    with LagSampler(rig.port, rig.settings.sample_interval) if on else contextlib.nullcontext() as sampler:
        run = rig.run(rig.settings.seconds, cell.name)
    ended = time.monotonic()
    cell.wall_seconds += ended - started
    cell.pgleap_cpu += rig.pgleap.cpu_seconds() - before[0]
    cell.source_cpu += server_cpu(rig.source) - before[1]
    cell.target_cpu += server_cpu(rig.target) - before[2]
    cell.host_busy.append(HostCpu.read().busy_percent_since(before[3]))
    cell.runs.append(run)
    if on:
        held, seconds = rig.console.commit_hold()
        cell.commits_held += held - held_before[0]
        cell.commit_hold_seconds += seconds - held_before[1]
    if isinstance(sampler, LagSampler):
        cell.lag += sampler.samples
        wait_replay(rig.console, caught_up, "replay to catch up after the slice", timeout=_CATCH_UP_TIMEOUT)
        cell.catch_up_seconds.append(time.monotonic() - ended)
    return run


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """`items` starting at index shift (mod len)."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def measure_cells(rig: Rig) -> dict[str, Cell]:
    """Every cell `rounds` times, the order rotating, so that drift on a shared machine hits the cells alike."""
    s = rig.settings
    cells = {name: Cell(name) for name in s.cells}
    total, done = len(cells) * s.rounds, 0
    for round_number in range(s.rounds):
        for name in rotated(s.cells, round_number):
            run = measure_slice(rig, cells[name])
            done += 1
            lag = cells[name].lag
            extra = f", lag max {max(x.lag_seconds for x in lag):.3f}s so far" if lag else ""
            progress(
                f"[{done}/{total}] {LABELS[name]:<28} round {round_number + 1}/{s.rounds}: "
                f"{run.tps:8.1f} tps, {run.latency_avg_ms:.2f} ms avg{extra}"
            )
    return cells


@dataclass
class Backlog:
    """The backlog test: the write rate while replay was stopped, then the drain."""

    write: PgbenchRun
    transactions: int = 0  # committed transactions waiting in the log when replay started (SHOW REPLAY)
    bytes: int = 0
    drain_seconds: float = float("nan")
    connect_seconds: float = float("nan")  # START REPLAY to the first sample showing it connected
    pgleap_cpu: float = float("nan")
    target_cpu: float = float("nan")
    host_busy: float = float("nan")
    product_rate: float = float("nan")  # SHOW REPLAY's apply_rate at the end (its own 10 s window)
    drained: ReplaySample | None = None

    @property
    def write_rate(self) -> float:
        """Transactions per second the workload committed (pgbench's TPS: every TPC-B transaction writes)."""
        return self.write.tps

    @property
    def apply_rate(self) -> float:
        """Backlog transactions per second of drain, START REPLAY to lag 0."""
        return self.transactions / self.drain_seconds if self.drain_seconds > 0 else float("nan")


def measure_backlog(rig: Rig) -> Backlog:
    """Stop replay, let the workload commit --backlog-transactions, then time START REPLAY to lag 0."""
    s = rig.settings
    set_mirroring(rig.console, True)
    applied_before = wait_replay(rig.console, caught_up, "replay to catch up", timeout=_CATCH_UP_TIMEOUT)
    rig.console.notes("STOP REPLAY")
    vacuum_hot_tables(rig.source, rig.target)
    progress(
        f"backlog: {s.backlog_transactions:,} TPC-B transactions through pgleap with capture on and replay stopped ..."
    )
    write = rig.run(_BACKLOG_TIMEOUT, "capture_on", s.backlog_transactions)
    backlog = Backlog(write)
    # The log holds a transaction before its COMMIT reaches the source, but settles it as committed right
    # after: wait until the backlog SHOW REPLAY counts has stopped growing.
    last = rig.console.replay()
    for _ in range(100):
        time.sleep(0.1)
        sample = rig.console.replay()
        if sample.lag_transactions == last.lag_transactions:
            break
        last = sample
    backlog.transactions, backlog.bytes = last.lag_transactions, last.lag_bytes
    progress(
        f"backlog: {backlog.transactions:,} transactions ({backlog.bytes / 1e6:.1f} MB) written at "
        f"{write.tps:.1f} tx/s (pgbench counted {write.transactions:,}; {applied_before.applied:,} applied before)"
    )
    vacuum_hot_tables(rig.source, rig.target)  # the replay is to face the same tables the workload faced
    before = (rig.pgleap.cpu_seconds(), server_cpu(rig.target), HostCpu.read())
    started = time.monotonic()
    rig.console.notes("START REPLAY")
    connected = wait_replay(rig.console, lambda x: x.connected, "replay to connect", timeout=_CATCH_UP_TIMEOUT)
    backlog.connect_seconds = connected.at - started
    drained = wait_replay(rig.console, caught_up, "replay to drain the backlog", timeout=_CATCH_UP_TIMEOUT)
    backlog.drain_seconds = drained.at - started
    backlog.pgleap_cpu = rig.pgleap.cpu_seconds() - before[0]
    backlog.target_cpu = server_cpu(rig.target) - before[1]
    backlog.host_busy = HostCpu.read().busy_percent_since(before[2])
    backlog.product_rate = drained.apply_rate
    backlog.drained = drained
    progress(
        f"backlog: drained in {backlog.drain_seconds:.2f}s ({backlog.apply_rate:.1f} tx/s; "
        f"SHOW REPLAY apply_rate {drained.apply_rate:.1f})"
    )
    return backlog


def warm_up(rig: Rig) -> None:
    """Unreported TPC-B through pgleap with mirroring off then on: caches, connections, the log's first pages."""
    if rig.settings.warmup <= 0:
        return
    for on in (False, True):
        set_mirroring(rig.console, on)
        vacuum_hot_tables(rig.source, rig.target)
        progress(f"warm-up: {rig.settings.warmup} s of TPC-B, capture {'on' if on else 'off'}")
        rig.run(rig.settings.warmup, "capture_on" if on else "capture_off")
    wait_replay(rig.console, caught_up, "replay to catch up after the warm-up", timeout=_CATCH_UP_TIMEOUT)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything the report needs."""

    settings: Settings
    source_version: str
    target_version: str
    load_average: str
    copy_seconds: float
    copy_report: str
    cells: dict[str, Cell]
    backlog: Backlog
    final: ReplaySample
    capture: dict[str, Any]
    pgleap_log: str
    profile_text: str = ""


def run_benchmark(settings: Settings) -> Outcome:
    """Start the servers and pgleap, copy, measure, stop everything (also on errors and Ctrl-C)."""
    with open("/proc/loadavg") as handle:
        load = " ".join(handle.read().split()[:3])
    with (
        Lab() as lab,
        tempfile.TemporaryDirectory(prefix="pgleap-bench-mirror-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        source = lab.primary(settings.source_major, settings=server_settings(settings.clients))
        target = lab.target(settings.target_major, settings=server_settings(settings.clients))
        initialise_pgbench(source, settings.scale, workdir)
        process, port = start_pgleap(settings, source, target, workdir, stack)
        console = Console(port)
        stack.callback(console.close)
        rig = Rig(settings, source, target, process, port, console, workdir)
        console.notes("START CAPTURE")
        copy_seconds, copy_report = run_copy(settings, workdir)
        progress(f"copy: {copy_seconds:.1f}s; START REPLAY")
        console.notes("START REPLAY")
        wait_replay(console, caught_up, "replay to start", timeout=_CATCH_UP_TIMEOUT)
        warm_up(rig)
        cells = measure_cells(rig)
        backlog = measure_backlog(rig)
        final = console.replay()
        capture = next((r for r in console.rows("SHOW CAPTURE") if r["database"] == DATABASE), {})
        console.close()
        process.stop()
        log_text = (workdir / "pgleap.log").read_text(errors="replace")
    profile_text = cprofile_summary() if settings.cprofile else ""
    return Outcome(
        settings,
        source.install.version,
        target.install.version,
        load,
        copy_seconds,
        copy_report,
        cells,
        backlog,
        final,
        capture,
        log_text,
        profile_text,
    )


def cprofile_summary(top: int = 30) -> str:
    """The top functions of pgleap's cProfile file, by own time and by cumulative time."""
    import io
    import pstats

    path = RESULTS_DIR / "mirror-pgleap.prof"
    if not path.exists():
        return f"(no profile: {path} was not written)"
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return f"cProfile of pgleap (whole run, written to {path}):\n{out.getvalue()}"


# -- reporting -----------------------------------------------------------------------------


def fmt(value: float, digits: int = 3) -> str:
    """A number, or n/a for NaN."""
    return "n/a" if value != value else f"{value:.{digits}f}"


def float_percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of floats (_common.percentile is for integer latencies); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(fraction * len(ordered))) - 1)]


_COUNTS = ("_transactions", "_transactions_max")


def figures(outcome: Outcome) -> list[tuple[str, float]]:
    """(name, value) of every figure, the three the issue names first."""
    cells, backlog = outcome.cells, outcome.backlog
    on, off = cells["capture_on"], cells["capture_off"]
    lags = [x.lag_seconds for x in on.lag]
    pairs = [
        ("ratio_capture_on_off_tps", ratio(on.tps, off.tps)),
        ("replay_lag_p99_s", float_percentile(lags, 0.99)),
        ("ratio_apply_backlog_write_rate", ratio(backlog.apply_rate, backlog.write_rate)),
        ("replay_lag_max_s", max(lags) if lags else float("nan")),
        ("replay_lag_p50_s", float_percentile(lags, 0.50)),
        ("replay_lag_transactions_max", float(max((x.lag_transactions for x in on.lag), default=-1))),
        ("tps_capture_off", off.tps),
        ("tps_capture_on", on.tps),
    ]
    if "direct" in cells:
        direct = cells["direct"]
        pairs += [
            ("tps_direct", direct.tps),
            ("ratio_capture_on_direct_tps", ratio(on.tps, direct.tps)),
            ("ratio_capture_off_direct_tps", ratio(off.tps, direct.tps)),
        ]
    pairs += [
        ("latency_p99_ms_capture_off", off.latency_ms(0.99)),
        ("latency_p99_ms_capture_on", on.latency_ms(0.99)),
        ("commit_hold_mean_ms_capture_on", on.commit_hold_mean_ms),
        ("pgleap_us_per_tx_capture_off", off.us_per_transaction(off.pgleap_cpu)),
        ("pgleap_us_per_tx_capture_on", on.us_per_transaction(on.pgleap_cpu)),
        ("backlog_transactions", float(backlog.transactions)),
        ("backlog_write_rate_tps", backlog.write_rate),
        ("backlog_apply_rate_tps", backlog.apply_rate),
    ]
    return pairs


def backlog_lines(s: Settings, b: Backlog) -> list[str]:
    """The backlog test's lines of the report."""
    per_tx = 1e6 * b.pgleap_cpu / b.transactions if b.transactions else float("nan")
    return [
        f"backlog: the workload with replay stopped: {b.write.transactions:,} transactions committed in "
        f"{fmt(b.write.transactions / b.write_rate, 1)} s at {b.write_rate:.1f} tx/s (the write rate; p99 latency "
        f"{fmt(percentile(b.write.latencies_us, 0.99) / 1000, 2)} ms); the log held {b.transactions:,} of them "
        f"after S ({b.bytes / 1e6:.1f} MB)",
        f"  START REPLAY -> lag 0 in {fmt(b.drain_seconds, 2)} s (connected after {fmt(b.connect_seconds, 2)} s): "
        f"{fmt(b.apply_rate, 1)} tx/s = {fmt(ratio(b.apply_rate, b.write_rate), 2)} x the write rate; "
        f"SHOW REPLAY's own apply_rate at the end {fmt(b.product_rate, 1)} tx/s (10 s window)",
        f"  during the drain: pgleap CPU {fmt(b.pgleap_cpu, 2)} s "
        f"({fmt(100 * ratio(b.pgleap_cpu, b.drain_seconds), 1)}% of a core, {fmt(per_tx, 1)} us/tx), "
        f"target server CPU {fmt(b.target_cpu, 2)} s ({fmt(100 * ratio(b.target_cpu, b.drain_seconds), 1)}%), "
        f"host busy {fmt(b.host_busy, 1)}%",
    ]


def report(outcome: Outcome) -> str:
    """The whole report; its last lines are the `name: value` figures."""
    s, cells, b = outcome.settings, outcome.cells, outcome.backlog
    lines = [
        f"pgleap {pgleap.__version__} mirror bench: PostgreSQL {outcome.source_version} source -> "
        f"PostgreSQL {outcome.target_version} target, pgleap run in front of the source; {os.cpu_count()} CPUs, "
        f"load average at start {outcome.load_average}" + ("; QUICK smoke run" if s.quick else ""),
        f"workload: pgbench TPC-B -M {s.mode} -n, {s.clients} clients, -j {s.jobs}, scale {s.scale}; "
        f"{s.rounds} x {s.seconds} s per cell, cell order rotating (TPS: median of the slices); "
        f"pgbench_branches/tellers vacuumed directly on both servers before every slice",
        f"config: durability = {s.durability}"
        + (f", batch_interval = {s.batch_interval}" if s.durability == "batch" else "")
        + f", bypass_check_interval = {s.bypass_check_interval}, change log in "
        + (str(s.log_dir) if s.log_dir is not None else "the bench's temporary directory under /tmp")
        + " (change log: SQLite WAL, synchronous=FULL); replay in the pgleap process, product defaults "
        "(batch_size 200, poll 50 ms); servers: "
        + ", ".join(f"{k}={v}" for k, v in server_settings(s.clients).items())
        + ", fsync=off (lab); capture-off slices run with capture and replay stopped, capture-on slices with both "
        "running (STOP/START CAPTURE and REPLAY between slices), so the target is not a faithful copy after "
        "the first capture-off slice: this bench measures, it does not verify",
        f"copy before replay: pgleap copy --workers {s.jobs} after START CAPTURE, {outcome.copy_seconds:.1f}s"
        + (f" ({outcome.copy_report.splitlines()[0]})" if outcome.copy_report else ""),
    ]
    if s.cprofile:
        lines.append("pgleap ran under cProfile: every figure below is slowed by the profiler")
    lines.append("")
    header = (
        f"{'cell':<28} {'TPS':>8} {'spread%':>7} {'p50 ms':>7} {'p99 ms':>7} {'pgleap CPU%':>11} "
        f"{'pgleap us/tx':>12} {'source CPU%':>11} {'target CPU%':>11} {'host busy%':>10}"
    )
    lines += [header, "-" * len(header)]
    for name in s.cells:
        c = cells[name]
        lines.append(
            f"{LABELS[name]:<28} {c.tps:>8.1f} {c.spread_percent:>7.1f} {fmt(c.latency_ms(0.5), 2):>7} "
            f"{fmt(c.latency_ms(0.99), 2):>7} "
            f"{fmt(c.cpu_percent(c.pgleap_cpu), 1) if name != 'direct' else '-':>11} "
            f"{fmt(c.us_per_transaction(c.pgleap_cpu), 1) if name != 'direct' else '-':>12} "
            f"{fmt(c.cpu_percent(c.source_cpu), 1):>11} {fmt(c.cpu_percent(c.target_cpu), 1):>11} "
            f"{fmt(median(c.host_busy), 1):>10}"
        )
    lines.append(
        "  rounds' TPS: " + "; ".join(f"{n} " + ", ".join(f"{r.tps:.1f}" for r in cells[n].runs) for n in s.cells)
    )
    on = cells["capture_on"]
    lags = [x.lag_seconds for x in on.lag]
    lines += [
        "",
        f"replay lag during the capture-on slices ({len(lags)} SHOW REPLAY samples, every {s.sample_interval:g} s): "
        f"p50 {fmt(float_percentile(lags, 0.5))} s, p99 {fmt(float_percentile(lags, 0.99))} s, "
        f"max {fmt(max(lags) if lags else float('nan'))} s; lag in transactions p99 "
        f"{fmt(float_percentile([float(x.lag_transactions) for x in on.lag], 0.99), 0)}, max "
        f"{max((x.lag_transactions for x in on.lag), default=-1)}; catch-up after each slice (pgbench end to lag 0): "
        + ", ".join(f"{x:.2f}s" for x in on.catch_up_seconds),
        f"held COMMITs during the capture-on slices: {on.commits_held:,}, waiting {fmt(on.commit_hold_mean_ms, 2)} ms "
        "on average for their change-log record to be durable (SHOW CAPTURE): what capture adds to each COMMIT",
        "",
        *backlog_lines(s, b),
        "",
        f"replay at the end: applied {outcome.final.applied:,} in the last run, divergences "
        f"{outcome.final.divergences}, apply errors {outcome.final.apply_errors}, paused "
        f"{outcome.final.paused_error or 'no'}, stopped {outcome.final.stopped_error or 'no'}",
        "capture at the end: "
        + ", ".join(
            f"{k} {outcome.capture.get(k)}"
            for k in ("transactions", "log_failures", "unreplayable", "log_healthy", "log_pending", "bypass_writers")
        ),
    ]
    problems = [line for line in outcome.pgleap_log.splitlines() if " ERROR " in line or "Traceback" in line]
    if problems:
        lines += [f"pgleap logged {len(problems)} error line(s); the first ones:"] + [f"  {p}" for p in problems[:5]]
    if outcome.profile_text:
        lines += ["", outcome.profile_text]
    lines += ["", "figures (targets: TPS capture on / off >= 0.95, replay lag p99 <= 1 s, apply / write rate >= 3):"]
    # Counts print as integers, everything else with three decimals.
    lines += [f"{name}: {fmt(value, 0 if name.endswith(_COUNTS) else 3)}" for name, value in figures(outcome)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    settings = parse_args(argv)
    stop_on_signals()
    try:
        outcome = run_benchmark(settings)
    except (BenchError, psycopg.Error) as exc:
        print(f"bench/mirror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/mirror: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    print(report(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
