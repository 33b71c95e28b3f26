"""`pgleap demo`: real servers from the lab, pgleap in front, a pgbench workload, the console and metrics,
capture and the copy to the new server under that load, replay, and a row-by-row equality check."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pgleap.config import UpgradeConfig, parse_config
from pgleap.demo_upgrade import Mirroring
from pgleap.demo_upgrade import server as mirror_server
from pgleap.lab import Lab, LabError, LabServer, MissingBinaryError, client_tool
from pgleap.metrics import start_metrics_server
from pgleap.testing import ProxyThread, render_config

if TYPE_CHECKING:
    import psycopg

__all__ = ["DemoError", "run_demo"]

HOST = "127.0.0.1"
OLD_MAJOR = 10  # the oldest major the registries give us; md5 auth stands in for a 9.x server
NEW_MAJOR = 18
DATABASE = "app"
APP_USER, APP_PASSWORD = "app", "app-secret"  # render_config's default client user
ADMIN_USER, ADMIN_PASSWORD = "pgleap_admin", "admin-secret"  # render_config's default admin
PGBENCH_SCALE = 5
PGBENCH_CLIENTS, PGBENCH_THREADS = 4, 2
REFRESH_SECONDS = 3.0
LOG_WIDTH = 160
REPLAY_COLUMNS = (
    "database",
    "applied_position",
    "last_position",
    "lag_transactions",
    "lag_seconds",
    "applied",
    "skipped_in_snapshot",
    "divergences",
    "apply_errors",
)
PGBENCH_GRACE_SECONDS = 120.0  # beyond -T: connection setup, the last transactions, the summary
SETUP_HINT = "run scripts/setup (it fetches the PostgreSQL binaries the lab needs), then try again"
_PG10 = 100000


class DemoError(Exception):
    """A step of the demo failed; the message says which and what to do."""


@dataclass(frozen=True)
class SourceEndpoint:
    """What render_config needs to route database `app` to the primary's own `app` database."""

    host: str
    port: int
    superuser: str
    password: str
    database: str


@dataclass
class Cast:
    """The servers of the demo, named as in the plan."""

    alice: LabServer  # old primary, serving the application
    bob: LabServer  # streaming replica of Alice
    charles: LabServer  # new-major target


@dataclass
class ResultTable:
    """Columns and rows of one query, as psql would show them."""

    title: str
    columns: list[str]
    rows: list[tuple[Any, ...]]


@dataclass
class MetricsSample:
    """The few Prometheus series the demo shows, summed over databases."""

    transactions: float
    queries: float
    bytes_in: float
    bytes_out: float
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class Snapshot:
    """Everything shown at one refresh while pgbench runs."""

    elapsed: float
    stats: ResultTable
    clients: ResultTable
    metrics: MetricsSample
    tps_now: float | None
    replication: ResultTable


@dataclass
class PgbenchSummary:
    """The numbers pgbench prints at the end of a run."""

    tps: float
    processed: int
    failed: int
    latency_ms: float | None
    output: str


# ---------------------------------------------------------------------------- entry point


def run_demo(seconds: int) -> int:
    """Run the demo for `seconds` of pgbench; 0 on success, non-zero with a message on failure."""
    console = make_console()
    try:
        with _sigterm_as_interrupt():
            return _run(console, seconds)
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted; everything it started has been stopped[/]")
        return 130
    except MissingBinaryError as exc:
        console.print(
            f"[red]demo: PostgreSQL binaries are missing:[/] {exc}"
        )  # the lab's message says how to fetch them
        return 2
    except ModuleNotFoundError as exc:
        console.print(f"[red]demo: Python package {exc.name!r} is missing;[/] {SETUP_HINT}")
        return 2
    except (DemoError, LabError, OSError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    except Exception as exc:
        console.print(f"[red]demo failed:[/] {type(exc).__name__}: {exc}")
        return 1


def make_console() -> Console:
    """A console that is live on a terminal and plain (no colours, no cursor moves) in logs and CI."""
    console = Console(force_terminal=None, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Rich assumes 80 columns without a terminal, which folds every console table into slivers.
        console = Console(force_terminal=None, highlight=False, width=LOG_WIDTH)
    return console


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a CI timeout, `kill`) like Ctrl-C so that every finally block still runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(console: Console, seconds: int) -> int:
    if seconds < 1:
        raise DemoError("--seconds must be at least 1")
    import psycopg  # imported here so a broken install gets the setup hint rather than a traceback

    console.rule("[bold]pgleap demo")
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="pgleap-demo-") as workdir:
        cast = _start_servers(lab, console)
        state = Path(workdir)
        with _start_proxy(cast, state) as proxy, _serve_metrics(proxy) as metrics_port:
            _show_endpoints(console, cast, proxy.port, metrics_port)
            with (
                psycopg.connect(_admin_dsn(proxy.port), autocommit=True) as admin,
                psycopg.connect(cast.alice.dsn(), autocommit=True) as alice,
            ):
                _pgbench_init(console, proxy.port)
                mirroring = Mirroring(_upgrade(cast), state / "pgleap-state.db", _admin_dsn(proxy.port))
                mirroring.start(admin, console)
                summary = _run_workload(console, seconds, admin, alice, metrics_port, proxy.port)
                try:
                    mirroring.finish(admin, console)
                except RuntimeError as exc:
                    raise DemoError(str(exc)) from exc
                console.print(result_table(_columns(console_query(admin, "SHOW REPLAY"), REPLAY_COLUMNS)))
                with psycopg.connect(_app_dsn(proxy.port), autocommit=True) as app:
                    history_rows = _check_history(app, summary)
                    # The app session stays open so that SHOW SERVERS has a server connection to list.
                    _show_final(console, summary, history_rows, admin)
            _show_psql_equivalents(console, proxy.port, metrics_port)
    console.print(
        "[bold]What's next:[/] later steps add validation of live queries, the cutover to Charles "
        "and the rollback, all through this same proxy."
    )
    console.print("[green]demo finished: servers and proxy stopped.[/]")
    return 0


# ---------------------------------------------------------------------------- servers and proxy


def _start_servers(lab: Lab, console: Console) -> Cast:
    """Alice (old primary, md5 like 9.x), Bob (her streaming replica), Charles (new target)."""
    console.print(f"starting Alice: PostgreSQL {OLD_MAJOR} primary, md5 auth (as 9.x servers offer) ...")
    alice = lab.primary(OLD_MAJOR, auth="md5")
    alice.psql(f"CREATE DATABASE {DATABASE}")
    console.print("starting Bob: streaming replica of Alice (pg_basebackup) ...")
    bob = lab.replica(alice)
    console.print(f"starting Charles: PostgreSQL {NEW_MAJOR} target, SCRAM auth ...")
    charles = lab.target(NEW_MAJOR)
    return Cast(alice, bob, charles)


def _upgrade(cast: Cast) -> UpgradeConfig:
    """Database `app`: Alice the source, Bob the replica the copy reads, Charles the target."""
    return UpgradeConfig(
        DATABASE,
        mirror_server(cast.alice, DATABASE),
        target=mirror_server(cast.charles, DATABASE),
        replica=mirror_server(cast.bob, DATABASE),
    )


@contextmanager
def _start_proxy(cast: Cast, state: Path) -> Iterator[ProxyThread]:
    """pgleap on a free port, routing database `app` to Alice's, with Charles as its target; stopped on exit."""
    alice = cast.alice
    source = SourceEndpoint(alice.host, alice.port, alice.superuser, alice.password, DATABASE)
    extra = f'state_path = "{state / "pgleap-state.db"}"\nchangelog_path = "{state / "pgleap-changes.db"}"'
    text = render_config(
        {DATABASE: source},
        admin=(ADMIN_USER, ADMIN_PASSWORD),
        extra=extra,
        targets={DATABASE: mirror_server(cast.charles, DATABASE)},
    )
    config = parse_config(text)
    proxy = ProxyThread(config)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()


@contextmanager
def _serve_metrics(proxy: ProxyThread) -> Iterator[int]:
    """Serve /metrics for the proxy on a free port, yielding the port."""
    assert proxy.proxy is not None
    server = start_metrics_server(proxy.proxy, HOST, 0)
    try:
        yield server.port
    finally:
        server.stop()


def _admin_dsn(port: int) -> str:
    return f"host={HOST} port={port} dbname=pgleap user={ADMIN_USER} password={ADMIN_PASSWORD} connect_timeout=10"


def _app_dsn(port: int) -> str:
    return f"host={HOST} port={port} dbname={DATABASE} user={APP_USER} password={APP_PASSWORD} connect_timeout=10"


def _show_endpoints(console: Console, cast: Cast, proxy_port: int, metrics_port: int) -> None:
    table = Table(title="the cast", box=box.SIMPLE_HEAD)
    for column in ("name", "role", "server", "address", "note"):
        table.add_column(column)
    table.add_row(
        "Alice",
        "source primary",
        f"PostgreSQL {cast.alice.install.version}",
        f"{HOST}:{cast.alice.port}",
        "md5 auth, like 9.x servers",
    )
    table.add_row(
        "Bob",
        "streaming replica",
        f"PostgreSQL {cast.bob.install.version}",
        f"{HOST}:{cast.bob.port}",
        "the copy will read from it",
    )
    table.add_row(
        "Charles",
        "upgrade target",
        f"PostgreSQL {cast.charles.install.version}",
        f"{HOST}:{cast.charles.port}",
        "started; later steps copy and cut over to it",
    )
    table.add_row(
        "pgleap", "proxy", "pgleap", f"{HOST}:{proxy_port}", f"clients connect here; metrics on :{metrics_port}/metrics"
    )
    console.print(table)


# ---------------------------------------------------------------------------- pgbench


def _pgbench_argv(port: int, *options: str) -> list[str]:
    return [str(client_tool("pgbench")), *options, "-h", HOST, "-p", str(port), "-U", APP_USER, DATABASE]


def _pgbench_env() -> dict[str, str]:
    """The environment pgbench gets: the password through PGPASSWORD, never on the command line."""
    env = dict(os.environ)
    env.update(PGPASSWORD=APP_PASSWORD, PGCONNECT_TIMEOUT="10")
    return env


def _pgbench_init(console: Console, port: int) -> None:
    """pgbench -i through pgleap (DDL, COPY, VACUUM: all through the proxy)."""
    console.print(f"pgbench -i -s {PGBENCH_SCALE} through pgleap ...")
    result = subprocess.run(
        _pgbench_argv(port, "-i", "-s", str(PGBENCH_SCALE)),
        env=_pgbench_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(
            f"pgbench -i through pgleap exited {result.returncode}:\n{_tail(result.stdout + result.stderr)}"
        )


def _run_workload(
    console: Console,
    seconds: int,
    admin: psycopg.Connection[Any],
    alice: psycopg.Connection[Any],
    metrics_port: int,
    proxy_port: int,
) -> PgbenchSummary:
    """Run pgbench for `seconds` through pgleap, refreshing the console, metrics and replica panels."""
    options = ("-c", str(PGBENCH_CLIENTS), "-j", str(PGBENCH_THREADS), "-T", str(seconds))
    console.print(f"pgbench {' '.join(options)} through pgleap, {HOST}:{proxy_port} ...")
    with tempfile.TemporaryFile("w+") as output:
        # A file, not a pipe: pgbench must never block on output nobody reads while we poll.
        process = subprocess.Popen(
            _pgbench_argv(proxy_port, *options),
            env=_pgbench_env(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _watch(console, process, seconds, admin, alice, metrics_port)
        finally:
            _stop_process(process)
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise DemoError(f"pgbench exited {process.returncode}:\n{_tail(text)}")
    return parse_pgbench(text)


def _watch(
    console: Console,
    process: subprocess.Popen[str],
    seconds: int,
    admin: psycopg.Connection[Any],
    alice: psycopg.Connection[Any],
    metrics_port: int,
) -> None:
    """Refresh the panels every REFRESH_SECONDS until pgbench exits (or overruns its grace time)."""
    started = time.monotonic()
    deadline = started + seconds + PGBENCH_GRACE_SECONDS
    previous: MetricsSample | None = None
    with _display(console) as show:
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise DemoError(f"pgbench still running {PGBENCH_GRACE_SECONDS:.0f}s after its -T {seconds}")
            _sleep_while_running(process, REFRESH_SECONDS)
            if process.poll() is not None:
                break
            snapshot = _take_snapshot(time.monotonic() - started, admin, alice, metrics_port, previous)
            previous = snapshot.metrics
            show(render_snapshot(snapshot))


def _sleep_while_running(process: subprocess.Popen[str], seconds: float) -> None:
    """Sleep up to `seconds`, waking early when the process exits."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def _stop_process(process: subprocess.Popen[str]) -> None:
    """Terminate a child that is still running (error or Ctrl-C), then reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_TPS = re.compile(r"^tps = ([\d.]+)", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.MULTILINE)


def parse_pgbench(output: str) -> PgbenchSummary:
    """The summary numbers of a pgbench run's output."""
    tps, processed = _TPS.search(output), _PROCESSED.search(output)
    if tps is None or processed is None:
        raise DemoError(f"could not read pgbench's summary:\n{_tail(output)}")
    failed, latency = _FAILED.search(output), _LATENCY.search(output)
    return PgbenchSummary(
        tps=float(tps.group(1)),
        processed=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,  # pgbench < 15 has no such line: failures abort the run
        latency_ms=float(latency.group(1)) if latency else None,
        output=output,
    )


def _check_history(app: psycopg.Connection[Any], summary: PgbenchSummary) -> int:
    """Fail unless the run was clean and every transaction pgbench counted left its pgbench_history row."""
    if summary.failed:
        raise DemoError(
            f"pgbench reported {summary.failed} failed transactions through pgleap:\n{_tail(summary.output)}"
        )
    if summary.tps <= 0:
        raise DemoError(f"pgbench reported no throughput:\n{_tail(summary.output)}")
    row = app.execute("SELECT count(*) FROM pgbench_history").fetchone()
    history = int(row[0]) if row else 0
    if history != summary.processed:
        raise DemoError(f"pgbench counted {summary.processed} transactions but pgbench_history has {history} rows")
    return history


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------- what the panels show


def console_query(conn: psycopg.Connection[Any], command: str) -> ResultTable:
    """Run one admin console command (a simple query, as psql sends it) and return its table."""
    cursor = conn.execute(command)  # no parameters: psycopg sends a simple Query, all the console accepts
    columns = [c.name for c in cursor.description or ()]
    return ResultTable(command, columns, [tuple(row) for row in cursor.fetchall()])


def replication_sql(server_version_num: int) -> str:
    """Replay lag per standby from the primary's pg_stat_replication, in the server's own vocabulary."""
    if server_version_num >= _PG10:
        return (
            "SELECT application_name AS standby, state, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_lag_bytes, "
            "replay_lag::text AS replay_lag_time FROM pg_stat_replication"
        )
    # 9.x: *_location columns and xlog functions; no lag-time columns before 10.
    return (
        "SELECT application_name AS standby, state, "
        "pg_xlog_location_diff(pg_current_xlog_location(), replay_location)::bigint AS replay_lag_bytes, "
        "NULL::text AS replay_lag_time FROM pg_stat_replication"
    )


def _replication(alice: psycopg.Connection[Any]) -> ResultTable:
    sql = replication_sql(alice.info.server_version)
    cursor = alice.execute(sql)
    columns = [c.name for c in cursor.description or ()]
    return ResultTable(
        "replica (Bob) replay lag, from Alice's pg_stat_replication", columns, [tuple(row) for row in cursor.fetchall()]
    )


def scrape_metrics(port: int) -> MetricsSample:
    """Read /metrics and sum the demo's series over databases."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pgleap_query_duration_seconds_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            else:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    cumulative = sorted(buckets.items())
    return MetricsSample(
        transactions=sums.get("pgleap_transactions_total", 0.0),
        queries=sums.get("pgleap_queries_total", 0.0),
        bytes_in=sums.get("pgleap_received_bytes_total", 0.0),
        bytes_out=sums.get("pgleap_sent_bytes_total", 0.0),
        p50_ms=_quantile_ms(cumulative, 0.50),
        p99_ms=_quantile_ms(cumulative, 0.99),
    )


def _quantile_ms(cumulative: Sequence[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative Prometheus buckets, interpolated linearly inside a bucket (as histogram_quantile)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound * 1000  # beyond the last finite bucket: its bound is all we know
            width = count - lower_count
            fraction = (rank - lower_count) / width if width else 1.0
            return (lower_bound + (bound - lower_bound) * fraction) * 1000
        lower_bound, lower_count = bound, count
    return None


def _take_snapshot(
    elapsed: float,
    admin: psycopg.Connection[Any],
    alice: psycopg.Connection[Any],
    metrics_port: int,
    previous: MetricsSample | None,
) -> Snapshot:
    metrics = scrape_metrics(metrics_port)
    tps_now = (metrics.transactions - previous.transactions) / REFRESH_SECONDS if previous else None
    return Snapshot(
        elapsed=elapsed,
        stats=console_query(admin, "SHOW STATS"),
        clients=console_query(admin, "SHOW CLIENTS"),
        metrics=metrics,
        tps_now=tps_now,
        replication=_replication(alice),
    )


# ---------------------------------------------------------------------------- rendering


@contextmanager
def _display(console: Console) -> Iterator[Any]:
    """A `show(renderable)` function: a Live region on a terminal, successive prints otherwise (CI logs)."""
    if not console.is_terminal:
        yield console.print
        return
    with Live(console=console, auto_refresh=False, transient=False) as live:

        def show(renderable: RenderableType) -> None:
            live.update(renderable, refresh=True)

        yield show


def _columns(result: ResultTable, names: Sequence[str]) -> ResultTable:
    """Only the named columns of a result (a console row can be wider than a terminal)."""
    keep = [result.columns.index(n) for n in names]
    return ResultTable(result.title, list(names), [tuple(row[i] for i in keep) for row in result.rows])


def result_table(result: ResultTable, caption: str | None = None) -> Table:
    """A rich table with psql's layout: column names as headers, one line per row."""
    table = Table(title=result.title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left")
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    if not result.rows:
        table.caption = "(0 rows)"
    return table


def _metrics_table(metrics: MetricsSample, tps_now: float | None) -> Table:
    table = Table(title="Prometheus /metrics", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("series")
    table.add_column("value", justify="right")
    table.add_row("pgleap_transactions_total", f"{metrics.transactions:,.0f}")
    table.add_row("  rate over the last interval", "-" if tps_now is None else f"{tps_now:,.0f}/s")
    table.add_row("pgleap_queries_total", f"{metrics.queries:,.0f}")
    table.add_row("pgleap_received_bytes_total", _human_bytes(metrics.bytes_in))
    table.add_row("pgleap_sent_bytes_total", _human_bytes(metrics.bytes_out))
    table.add_row("query latency p50 (histogram)", _ms(metrics.p50_ms))
    table.add_row("query latency p99 (histogram)", _ms(metrics.p99_ms))
    return table


def render_snapshot(snapshot: Snapshot) -> RenderableType:
    """The panel shown at each refresh."""
    return Panel(
        Group(
            result_table(snapshot.stats),
            result_table(snapshot.clients),
            _metrics_table(snapshot.metrics, snapshot.tps_now),
            result_table(snapshot.replication),
        ),
        title=f"pgleap admin console (dbname=pgleap) at t={snapshot.elapsed:.0f}s",
        title_align="left",
    )


def _show_final(console: Console, summary: PgbenchSummary, history_rows: int, admin: psycopg.Connection[Any]) -> None:
    table = Table(title="pgbench through pgleap", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("result")
    table.add_column("value", justify="right")
    table.add_row("tps", f"{summary.tps:,.1f}")
    table.add_row("transactions processed", f"{summary.processed:,}")
    table.add_row("failed transactions", str(summary.failed))
    table.add_row("latency average", _ms(summary.latency_ms))
    table.add_row("pgbench_history rows", f"{history_rows:,} (one per transaction: none lost)")
    console.print(table)
    console.print(
        result_table(
            console_query(admin, "SHOW SERVERS"), caption="the demo's own session, still open: pgbench's have closed"
        )
    )
    console.print(result_table(console_query(admin, "SHOW VERSION")))


def _show_psql_equivalents(console: Console, proxy_port: int, metrics_port: int) -> None:
    lines = [
        "# the same views from a shell, while a pgleap runs (`pgleap run -c pgleap.toml` keeps one up):",
        (
            f"PGPASSWORD={ADMIN_PASSWORD} psql 'host={HOST} port={proxy_port} dbname=pgleap user={ADMIN_USER}' "
            "-c 'SHOW STATS' -c 'SHOW CLIENTS' -c 'SHOW SERVERS' -c 'SHOW VERSION'"
        ),
        f"curl -s http://{HOST}:{metrics_port}/metrics | grep '^pgleap_'",
    ]
    console.print(Panel(Text("\n".join(lines)), title="try it yourself", title_align="left"))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _human_bytes(value: float) -> str:
    if value < 1024:
        return f"{value:,.0f} B"
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:,.1f} {unit}"
    return f"{value / 1024:,.1f} GiB"
