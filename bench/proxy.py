"""bench/proxy.py: pgbench direct to PostgreSQL, through pgleap and through PgBouncer, side by side in one run.

    .venv/bin/python bench/proxy.py [--seconds 30] [--clients 8] [--scale 10] [--rounds 3] [--profile]

A lab server (PostgreSQL 17 by default) is initialised once with `pgbench -i -s <scale>`; pgleap
(`pgleap run`, its own process) and PgBouncer (session pool mode) both front it. For each workload
(`-S` and the default TPC-B script, each with `-M simple` and `-M prepared`) every target runs
`--seconds` in total, split into `--rounds` slices whose target order rotates, so that drift on a
noisy machine hits all three alike; TPS is the median of the slices. The proxies' CPU use is read
from /proc while they run. The last lines printed are `ratio_<a>_<b>_<workload>: <x>`, one per ratio.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

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
    ratio,
    run_pgbench,
)
from _profile import PySpyRecorder, find_py_spy, summarize, write_folded
from pgleap.lab import Lab, LabServer, client_tool
from pgleap.lab.osuser import give_to_server_user, server_user

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATABASE = "postgres"
PGLEAP_USER = ("bench", "bench-secret")
PGLEAP_ADMIN = ("bench_admin", "bench-admin-secret")
PROFILED_WORKLOAD = "select_simple"
_START_ATTEMPTS = 3


@dataclass(frozen=True)
class Workload:
    """One pgbench workload: a name for the ratio lines, a label for the table, and pgbench options."""

    name: str
    label: str
    options: tuple[str, ...]


WORKLOADS = (
    Workload("select_simple", "-S simple", ("-S", "-M", "simple")),
    Workload("select_prepared", "-S prepared", ("-S", "-M", "prepared")),
    Workload("tpcb_simple", "TPC-B simple", ("-M", "simple")),
    Workload("tpcb_prepared", "TPC-B prepared", ("-M", "prepared")),
)


@dataclass(frozen=True)
class Target:
    """Where pgbench connects: the server itself or a proxy in front of it (whose CPU we read)."""

    name: str
    port: int
    user: str
    password: str
    process: ChildProcess | None = None

    def connection_options(self) -> list[str]:
        """pgbench's -h/-p/-U for this target."""
        return ["-h", LOCALHOST, "-p", str(self.port), "-U", self.user]

    def cpu_seconds(self) -> float:
        """CPU time the proxy process has used so far (0 for the server itself)."""
        return self.process.cpu_seconds() if self.process is not None else 0.0


@dataclass
class Measurement:
    """All slices of one workload on one target."""

    workload: Workload
    target: str
    runs: list[PgbenchRun] = field(default_factory=list)
    proxy_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    host_busy: list[float] = field(default_factory=list)
    profiled: bool = False

    @property
    def tps(self) -> float:
        """Median TPS of the slices."""
        return median(run.tps for run in self.runs)

    @property
    def spread_percent(self) -> float:
        """(max - min) / median of the slices' TPS, in percent: how noisy this cell was."""
        values = [run.tps for run in self.runs]
        return 100.0 * (max(values) - min(values)) / self.tps if len(values) > 1 and self.tps else 0.0

    @property
    def latency_avg_ms(self) -> float:
        """Median of the slices' average latency."""
        return median(run.latency_avg_ms for run in self.runs)

    @property
    def latency_p99_ms(self) -> float:
        """99th percentile over every logged transaction of every slice."""
        latencies = [value for run in self.runs for value in run.latencies_us]
        return percentile(latencies, 0.99) / 1000.0

    @property
    def transactions(self) -> int:
        """Transactions of all slices."""
        return sum(run.transactions for run in self.runs)

    @property
    def proxy_cpu_percent(self) -> float:
        """The proxy's CPU use while pgbench ran, in percent of one core."""
        return 100.0 * self.proxy_cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def proxy_us_per_transaction(self) -> float:
        """The proxy's CPU time per transaction, in microseconds."""
        return 1e6 * self.proxy_cpu_seconds / self.transactions if self.transactions else float("nan")


@dataclass(frozen=True)
class Settings:
    """The command line."""

    seconds: float
    rounds: int
    clients: int
    jobs: int
    scale: int
    major: int
    warmup: float
    workloads: tuple[Workload, ...]
    profile: bool
    profile_rate: int
    profile_native: bool

    @property
    def slice_seconds(self) -> int:
        """Length of one pgbench run."""
        return max(1, round(self.seconds / self.rounds))


# -- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30, help="pgbench time per workload and target (all rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="slices per workload and target, target order rotating")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s")
    parser.add_argument("--major", type=int, default=17, help="PostgreSQL major of the lab server")
    parser.add_argument("--warmup", type=float, default=5, help="unreported -S seconds per target before measuring")
    parser.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma-separated subset of " + ", ".join(w.name for w in WORKLOADS),
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"sample pgleap with py-spy during {PROFILED_WORKLOAD}; writes to bench/results/",
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C frames too (uvloop, libc); pauses pgleap at every sample",
    )
    args = parser.parse_args(argv)
    by_name = {w.name: w for w in WORKLOADS}
    unknown = [name for name in args.workloads.split(",") if name not in by_name]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    if args.rounds < 1 or args.clients < 1 or args.jobs < 1 or args.scale < 1 or args.seconds <= 0:
        parser.error("--seconds, --rounds, --clients, --jobs and --scale must be positive")
    return Settings(
        seconds=args.seconds,
        rounds=args.rounds,
        clients=args.clients,
        jobs=args.jobs,
        scale=args.scale,
        major=args.major,
        warmup=args.warmup,
        workloads=tuple(by_name[name] for name in args.workloads.split(",")),
        profile=args.profile,
        profile_rate=args.profile_rate,
        profile_native=args.profile_native,
    )


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout ends with the report."""
    print(message, file=sys.stderr, flush=True)


# -- the server ----------------------------------------------------------------------------


def server_settings(clients: int) -> dict[str, str]:
    """Lab server settings for benchmarking: the data set in shared buffers, few checkpoints, no autovacuum noise."""
    return {
        "shared_buffers": "512MB",
        "max_connections": str(max(100, 3 * clients + 20)),  # direct + pgbouncer's pool + pgleap's sessions
        "max_wal_size": "4GB",
        "checkpoint_timeout": "30min",
        "autovacuum": "off",  # pgbench vacuums its tables itself before every run
    }


def initialise_pgbench(pgbench: Path, server: LabServer, scale: int) -> None:
    """pgbench -i -s <scale>, directly on the server."""
    progress(f"pgbench -i -s {scale} on {server.name} (port {server.port}) ...")
    result = subprocess.run(
        [
            str(pgbench),
            "-i",
            "-q",
            "-s",
            str(scale),
            "-h",
            LOCALHOST,
            "-p",
            str(server.port),
            "-U",
            server.superuser,
            DATABASE,
        ],
        env={**os.environ, "PGPASSWORD": server.password, "LC_ALL": "C"},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{result.stderr[-3000:]}")


# -- the proxies ---------------------------------------------------------------------------


def start_on_free_port(make: Callable[[int], ChildProcess], stack: contextlib.ExitStack) -> tuple[ChildProcess, int]:
    """Start a listener on a free port, retrying on another port when one got taken meanwhile."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_port()
        process = stack.enter_context(make(port))
        try:
            process.wait_listening(port)
            return process, port
        except BenchError:
            process.stop()
            if attempt == _START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def toml_string(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value)


def pgleap_config(server: LabServer, port: int) -> str:
    """pgleap.toml: one client user, the lab superuser for the server login, no metrics endpoint."""
    return "\n".join(
        [
            "[pgleap]",
            f"listen_addr = {toml_string(LOCALHOST)}",
            f"listen_port = {port}",
            f"admin_user = {toml_string(PGLEAP_ADMIN[0])}",
            f"admin_password = {toml_string(PGLEAP_ADMIN[1])}",
            "",
            "[[users]]",
            f"name = {toml_string(PGLEAP_USER[0])}",
            f"password = {toml_string(PGLEAP_USER[1])}",
            'auth_method = "scram-sha-256"',
            "",
            "[[auto_upgrade]]",
            f"database = {toml_string(DATABASE)}",
            f"source_host = {toml_string(server.host)}",
            f"source_port = {server.port}",
            f"source_database = {toml_string(DATABASE)}",
            f"source_user = {toml_string(server.superuser)}",
            f"source_password = {toml_string(server.password)}",
            "",
        ]
    )


def pgleap_executable() -> Path:
    """The `pgleap` console script of the running venv."""
    path = Path(sys.executable).parent / "pgleap"
    if not path.exists():
        raise BenchError(f"{path} not found; install pgleap into the venv (pip install -e .)")
    return path


def start_pgleap(server: LabServer, workdir: Path, stack: contextlib.ExitStack) -> Target:
    """`pgleap run` as its own process in front of `server`."""

    def make(port: int) -> ChildProcess:
        config = workdir / "pgleap.toml"
        config.write_text(pgleap_config(server, port))
        return ChildProcess(
            "pgleap",
            [str(pgleap_executable()), "run", "-c", str(config), "--log-level", "WARNING"],
            workdir / "pgleap.log",
        )

    process, port = start_on_free_port(make, stack)
    progress(f"pgleap (pid {process.pid}) listening on {LOCALHOST}:{port}")
    return Target("pgleap", port, PGLEAP_USER[0], PGLEAP_USER[1], process)


def pgbouncer_config(server: LabServer, port: int, confdir: Path, clients: int) -> str:
    """pgbouncer.ini: session pooling, SCRAM for clients and server, TCP on 127.0.0.1 only, quiet logs."""
    return "\n".join(
        [
            "[databases]",
            f"{DATABASE} = host={server.host} port={server.port} dbname={DATABASE}",
            "",
            "[pgbouncer]",
            f"listen_addr = {LOCALHOST}",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {confdir / 'userlist.txt'}",
            "pool_mode = session",
            f"max_client_conn = {max(100, 2 * clients)}",
            f"default_pool_size = {clients + 4}",
            "server_tls_sslmode = disable",
            "ignore_startup_parameters = extra_float_digits",
            "log_connections = 0",
            "log_disconnections = 0",
            "",
        ]
    )


def pgbouncer_executable() -> Path:
    """pgbouncer from PATH or Debian's /usr/sbin."""
    for candidate in (os.environ.get("PGBOUNCER"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise BenchError("pgbouncer not found; `apt-get install -y pgbouncer` (scripts/setup installs it)")


def write_for_server_user(path: Path, text: str) -> None:
    """Write a file only the server user (pgbouncer runs as it) can read."""
    path.write_text(text)
    path.chmod(0o600)
    give_to_server_user(path)


def start_pgbouncer(
    server: LabServer, basedir: Path, workdir: Path, clients: int, stack: contextlib.ExitStack
) -> Target:
    """PgBouncer (it refuses to run as root: it runs as the lab's server user) in front of `server`."""
    confdir = basedir / "pgbouncer"
    confdir.mkdir(mode=0o700)
    give_to_server_user(confdir)
    write_for_server_user(confdir / "userlist.txt", f'"{server.superuser}" "{server.password}"\n')

    def make(port: int) -> ChildProcess:
        ini = confdir / "pgbouncer.ini"
        write_for_server_user(ini, pgbouncer_config(server, port, confdir, clients))
        return ChildProcess(
            "pgbouncer", [str(pgbouncer_executable()), str(ini)], workdir / "pgbouncer.log", user=server_user()
        )

    process, port = start_on_free_port(make, stack)
    progress(f"pgbouncer (pid {process.pid}) listening on {LOCALHOST}:{port}")
    return Target("pgbouncer", port, server.superuser, server.password, process)


# -- measuring -----------------------------------------------------------------------------


def pgbench_command(
    pgbench: Path, target: Target, settings: Settings, options: Sequence[str], seconds: float
) -> list[str]:
    """The pgbench argv of one run against `target`."""
    return [
        str(pgbench),
        *target.connection_options(),
        "-c",
        str(settings.clients),
        "-j",
        str(settings.jobs),
        "-T",
        str(max(1, round(seconds))),
        *options,
        DATABASE,
    ]


def run_slice(
    pgbench: Path, target: Target, settings: Settings, workload: Workload, workdir: Path, measurement: Measurement
) -> PgbenchRun:
    """One pgbench run of `workload` on `target`, added to `measurement` with the proxy's CPU use."""
    argv = pgbench_command(pgbench, target, settings, workload.options, settings.slice_seconds)
    cpu_before, host_before, started = target.cpu_seconds(), HostCpu.read(), time.monotonic()
    run = run_pgbench(
        argv, {"PGPASSWORD": target.password}, workdir / "pgbench_log", timeout=settings.slice_seconds + 300
    )
    measurement.wall_seconds += time.monotonic() - started
    measurement.proxy_cpu_seconds += target.cpu_seconds() - cpu_before
    measurement.host_busy.append(HostCpu.read().busy_percent_since(host_before))
    measurement.runs.append(run)
    return run


def warm_up(pgbench: Path, targets: Sequence[Target], settings: Settings) -> None:
    """A short unreported -S run per target: warms caches and checks every target works."""
    if settings.warmup <= 0:
        return
    for target in targets:
        progress(f"warm-up: {settings.warmup:g} s of -S through {target.name}")
        argv = pgbench_command(pgbench, target, settings, ("-S",), settings.warmup)
        result = subprocess.run(
            argv,
            env={**os.environ, "PGPASSWORD": target.password, "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=settings.warmup + 300,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise BenchError(f"warm-up through {target.name} failed:\n{result.stderr[-3000:]}")


def rotated(targets: Sequence[Target], shift: int) -> list[Target]:
    """`targets` starting at index shift (mod len)."""
    shift %= len(targets)
    return [*targets[shift:], *targets[:shift]]


@contextlib.contextmanager
def maybe_profiling(settings: Settings, target: Target, workload: Workload, stacks: Counter[str]) -> Iterator[bool]:
    """Sample pgleap with py-spy while this slice runs, if --profile asked for it; yields whether it does."""
    if not (settings.profile and target.name == "pgleap" and workload.name == PROFILED_WORKLOAD):
        yield False
        return
    assert target.process is not None
    RESULTS_DIR.mkdir(exist_ok=True)
    recorder = PySpyRecorder(
        find_py_spy(),
        target.process.pid,
        RESULTS_DIR / "pgleap-slice.folded",
        rate=settings.profile_rate,
        native=settings.profile_native,
    )
    recorder.start()
    try:
        yield True
    finally:
        stacks.update(recorder.stop())


def measure_all(
    pgbench: Path, targets: Sequence[Target], settings: Settings, workdir: Path, stacks: Counter[str]
) -> list[Measurement]:
    """Every workload on every target, slices interleaved across targets."""
    measurements = {(w.name, t.name): Measurement(w, t.name) for w in settings.workloads for t in targets}
    total = len(settings.workloads) * len(targets) * settings.rounds
    done = 0
    for index, workload in enumerate(settings.workloads):
        for round_number in range(settings.rounds):
            for target in rotated(targets, index + round_number):
                measurement = measurements[(workload.name, target.name)]
                with maybe_profiling(settings, target, workload, stacks) as profiled:
                    run = run_slice(pgbench, target, settings, workload, workdir, measurement)
                measurement.profiled |= profiled
                done += 1
                progress(
                    f"[{done}/{total}] {workload.label:<15} {target.name:<10} round {round_number + 1}/"
                    f"{settings.rounds}: {run.tps:10.1f} tps, {run.latency_avg_ms:.3f} ms avg"
                    + (" (profiled)" if profiled else "")
                )
    return list(measurements.values())


# -- reporting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    """What was measured with, for the report's header."""

    server_version: str
    pgbouncer_version: str
    pgbench: Path
    cpus: int
    load_average: str


def pgbouncer_version() -> str:
    """PgBouncer's version line."""
    result = subprocess.run(
        [str(pgbouncer_executable()), "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    return (result.stdout.splitlines() or ["PgBouncer ?"])[0].strip()


def describe_environment(server: LabServer, pgbench: Path) -> Environment:
    """Versions and machine of this run."""
    with open("/proc/loadavg") as handle:
        load = " ".join(handle.read().split()[:3])
    return Environment(
        server_version=server.install.version,
        pgbouncer_version=pgbouncer_version(),
        pgbench=pgbench,
        cpus=os.cpu_count() or 0,
        load_average=load,
    )


def format_number(value: float, digits: int) -> str:
    """A number with `digits` decimals, or "-" when it is not a number."""
    return "-" if value != value else f"{value:.{digits}f}"


def table(measurements: Sequence[Measurement]) -> list[str]:
    """The results table."""
    header = (
        f"{'workload':<15} {'target':<10} {'TPS':>10} {'spread%':>8} {'avg ms':>8} {'p99 ms':>8} "
        f"{'proxy CPU%':>10} {'proxy us/tx':>11} {'host busy%':>10}"
    )
    lines = [header, "-" * len(header)]
    for m in measurements:
        proxied = m.target != "direct"
        lines.append(
            f"{m.workload.label:<15} {m.target:<10} {m.tps:>10.1f} {m.spread_percent:>8.1f} "
            f"{format_number(m.latency_avg_ms, 3):>8} {format_number(m.latency_p99_ms, 3):>8} "
            f"{format_number(m.proxy_cpu_percent, 1) if proxied else '-':>10} "
            f"{format_number(m.proxy_us_per_transaction, 1) if proxied else '-':>11} "
            f"{format_number(median(m.host_busy), 1):>10}" + ("  (py-spy attached)" if m.profiled else "")
        )
    return lines


def ratios(measurements: Sequence[Measurement]) -> list[tuple[str, float]]:
    """(name, value) of pgleap/PgBouncer and pgleap/direct TPS per workload, in workload order."""
    tps = {(m.workload.name, m.target): m.tps for m in measurements}
    names = list(dict.fromkeys(m.workload.name for m in measurements))
    out: list[tuple[str, float]] = []
    for name in names:
        out.append((f"ratio_pgleap_pgbouncer_{name}", ratio(tps[(name, "pgleap")], tps[(name, "pgbouncer")])))
        out.append((f"ratio_pgleap_direct_{name}", ratio(tps[(name, "pgleap")], tps[(name, "direct")])))
    return out


def report(settings: Settings, env: Environment, measurements: Sequence[Measurement], profile_text: str) -> str:
    """The whole report; its last lines are the `name: value` ratio lines."""
    lines = [
        f"pgleap {pgleap.__version__} vs PgBouncer vs direct: PostgreSQL {env.server_version}, "
        f"{env.pgbouncer_version}, pgbench {env.pgbench}",
        f"{settings.clients} clients, -j {settings.jobs}, scale {settings.scale}, "
        f"{settings.rounds} x {settings.slice_seconds} s per workload and target (TPS: median of rounds), "
        f"{env.cpus} CPUs, load average at start {env.load_average}",
        "",
    ]
    if profile_text:
        lines += [f"py-spy profile of pgleap during {PROFILED_WORKLOAD} (written to {RESULTS_DIR}):", profile_text, ""]
    lines += table(measurements)
    lines += ["", "ratios (TPS of pgleap / TPS of the other):"]
    pairs = ratios(measurements)
    lines += [f"{name}: {format_number(value, 3)}" for name, value in pairs]
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------


def write_profile(stacks: Counter[str], measurements: Sequence[Measurement], rate: int) -> str:
    """Write the merged folded stacks and their summary to bench/results/; return the summary."""
    profiled = [m for m in measurements if m.profiled]
    if not stacks or not profiled:
        return ""
    RESULTS_DIR.mkdir(exist_ok=True)
    folded = RESULTS_DIR / f"pgleap-{PROFILED_WORKLOAD}.folded"
    write_folded(stacks, folded)
    text = summarize(stacks, seconds=profiled[0].wall_seconds, rate=rate, cpu_percent=profiled[0].proxy_cpu_percent)
    (RESULTS_DIR / f"pgleap-{PROFILED_WORKLOAD}-top.txt").write_text(text + "\n")
    progress(f"profile: {folded} (load it into https://www.speedscope.app or flamegraph.pl)")
    return text


def run_benchmark(settings: Settings) -> tuple[Environment, list[Measurement], str]:
    """Start the server and both proxies, measure everything, stop everything; return the numbers."""
    pgbench = client_tool("pgbench")
    stacks: Counter[str] = Counter()
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="pgleap-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        server = lab.primary(settings.major, settings=server_settings(settings.clients))
        env = describe_environment(server, pgbench)
        initialise_pgbench(pgbench, server, settings.scale)
        targets = [
            Target("direct", server.port, server.superuser, server.password),
            start_pgleap(server, workdir, stack),
            start_pgbouncer(server, lab.basedir, workdir, settings.clients, stack),
        ]
        warm_up(pgbench, targets, settings)
        measurements = measure_all(pgbench, targets, settings, workdir, stacks)
    profile_text = write_profile(stacks, measurements, settings.profile_rate)
    return env, measurements, profile_text


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt (even when SIGINT was inherited as ignored, as
    for `cmd &` in a script), so that everything started is stopped on the way out."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    settings = parse_args(argv)
    stop_on_signals()
    try:
        env, measurements, profile_text = run_benchmark(settings)
    except BenchError as exc:
        print(f"bench/proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/proxy: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    print(report(settings, env, measurements, profile_text), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
