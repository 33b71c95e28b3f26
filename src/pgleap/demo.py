"""`pgleap demo`: the whole upgrade on real servers from the lab, under a live pgbench workload through pgleap:
START UPGRADE (capture, the copy from the replica, catch-up, mirroring with verification and read comparison),
INITIATE CUTOVER once every gate holds, the workload going on on the new server, the reverse log back to the
old one, a row-by-row equality check, COMPLETE UPGRADE."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pgleap.config import ServerConfig, parse_config
from pgleap.demo_upgrade import UpgradeFailed, UpgradeStory, differences
from pgleap.demo_view import (
    HOST,
    MetricsSample,
    columns,
    console_query,
    display,
    make_console,
    metrics_table,
    ms,
    replay_metrics,
    replication,
    result_table,
    scrape_metrics,
)
from pgleap.demo_workload import PGBENCH_SCALE, PgbenchSummary, Workload, WorkloadError, check_history, pgbench_init
from pgleap.lab import Lab, LabError, LabServer, MissingBinaryError
from pgleap.metrics import start_metrics_server
from pgleap.testing import ProxyThread, render_config

if TYPE_CHECKING:
    import psycopg

__all__ = ["DemoError", "run_demo"]

OLD_MAJOR = 10  # the oldest major the registries give us; md5 auth stands in for a 9.x server
NEW_MAJOR = 18
DATABASE = "app"
APP_USER, APP_PASSWORD = "app", "app-secret"  # render_config's default client user
ADMIN_USER, ADMIN_PASSWORD = "pgleap_admin", "admin-secret"  # render_config's default admin
VALIDATION_SECONDS = 10  # how long mirroring must hold before cutover_ready (production: hours)
SAMPLE_RATE = 0.2  # of autocommit reads compared: the demo's reads are few, and a gate waits for one
WARMUP_SECONDS = 3.0  # pgbench running through pgleap before START UPGRADE
AFTER_CUTOVER_SECONDS = 5.0  # at least this much of the workload on Charles after the cutover
SERVERS_COLUMNS = ("client_id", "role", "port", "server_version", "state")
SETUP_HINT = "run scripts/setup (it fetches the PostgreSQL binaries the lab needs), then try again"


class DemoError(Exception):
    """A step of the demo failed; the message says which and what to do."""


@dataclass
class Cast:
    """The servers of the demo, named as in the plan."""

    alice: LabServer  # old primary, serving the application
    bob: LabServer  # streaming replica of Alice
    charles: LabServer  # new-major target


# ---------------------------------------------------------------------------- entry point


def run_demo(seconds: int) -> int:
    """Run the demo, pgbench running at least `seconds`; 0 on success, non-zero with a message on failure."""
    console = make_console()
    try:
        with _sigterm_as_interrupt():
            return _run(console, seconds)
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted; everything it started has been stopped[/]")
        return 130
    except MissingBinaryError as exc:
        console.print(f"[red]demo: PostgreSQL binaries are missing:[/] {exc}")  # the lab's message says how to fetch
        return 2
    except ModuleNotFoundError as exc:
        console.print(f"[red]demo: Python package {exc.name!r} is missing;[/] {SETUP_HINT}")
        return 2
    except (DemoError, UpgradeFailed, WorkloadError, LabError, OSError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    except Exception as exc:
        console.print(f"[red]demo failed:[/] {type(exc).__name__}: {exc}")
        return 1


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
        with _start_proxy(cast, Path(workdir)) as proxy, _serve_metrics(proxy) as metrics_port:
            _show_endpoints(console, cast, proxy.port, metrics_port)
            console.print(f"pgbench -i -s {PGBENCH_SCALE} through pgleap (on Alice, the only server in use) ...")
            pgbench_init(proxy.port, APP_USER, APP_PASSWORD, DATABASE)
            workload = Workload(proxy.port, APP_USER, APP_PASSWORD, DATABASE)
            try:
                with (
                    psycopg.connect(_admin_dsn(proxy.port), autocommit=True, prepare_threshold=None) as admin,
                    psycopg.connect(cast.alice.dsn(), autocommit=True) as alice,
                ):
                    _story(console, seconds, cast, workload, admin, alice, metrics_port, proxy.port)
            finally:
                workload.close()
            _show_psql_equivalents(console, proxy.port, metrics_port)
    console.print("[green]demo finished: servers and proxy stopped.[/]")
    return 0


def _story(
    console: Console,
    seconds: int,
    cast: Cast,
    workload: Workload,
    admin: psycopg.Connection[Any],
    alice: psycopg.Connection[Any],
    metrics_port: int,
    proxy_port: int,
) -> None:
    """The upgrade under the workload, from START UPGRADE to COMPLETE UPGRADE, each step checked."""
    import psycopg

    console.print(
        f"pgbench {' '.join(workload.options)} through pgleap, {HOST}:{proxy_port} (stopped after the cutover)"
    )
    workload.start()
    started = time.monotonic()
    time.sleep(WARMUP_SECONDS)
    workload.check_running()
    extras = _Extras(admin, alice, metrics_port)
    story = UpgradeStory(admin, console, DATABASE, workload.check_running, extras)
    with display(console) as shown:
        console.rule("START UPGRADE: pgleap drives the phases itself; the demo only watches")
        story.start()
        ready = story.until("cutover_ready", shown)
        console.print(
            f"[green]cutover_ready[/]: blocked_by is empty; {ready['tables_verified']} tables verified, "
            f"{ready['tables_differing']} differing, {ready['rows_differing']} rows differing; "
            f"{ready['queries_compared']} reads compared on both sides, {ready['queries_matching']} matching"
        )
        console.rule("INITIATE CUTOVER, pgbench still running")
        pause = story.cutover(shown)
        console.print(
            f"[bold]cutover pause: {pause:.3f} s[/] (SHOW UPGRADE STATUS.last_pause_s); pgbench goes on, on Charles"
        )
        charles_before = _history_rows(cast.charles)
        dwell = max(AFTER_CUTOVER_SECONDS, seconds - (time.monotonic() - started))
        story.watch(dwell, shown)
    charles_after = _history_rows(cast.charles)
    if charles_after <= charles_before:
        raise DemoError(f"pgbench wrote nothing on Charles after the cutover ({charles_before} -> {charles_after})")
    console.print(
        f"pgbench on Charles: pgbench_history {charles_before:,} -> {charles_after:,} rows in {dwell:.0f}s after the "
        f"cutover; Alice receives the same writes through the reverse log"
    )
    summary = workload.stop()
    console.rule("pgbench stopped; the reverse log catches up with Alice")
    reverse = story.reverse_caught_up(metrics_port, lambda: (_history_rows(cast.charles), _history_rows(cast.alice)))
    console.print(_reverse_table(reverse))
    with psycopg.connect(_app_dsn(proxy_port), autocommit=True) as app:
        problems = differences(_server(cast.charles), _server(cast.alice))
        if problems:
            raise DemoError("Charles differs from Alice:\n" + "\n".join(problems))
        try:
            history = check_history(app, summary)  # through pgleap: Charles answers now
        except WorkloadError as exc:
            raise DemoError(f"{exc}; {_duplicates(cast)}\n{summary.output}") from exc
        console.print(
            f"[green]Charles (PostgreSQL {NEW_MAJOR}) equals Alice (PostgreSQL {OLD_MAJOR}), every table row by "
            f"row: 0 differences[/]; the reverse log applied {reverse['applied_total']:.0f} transactions to Alice, "
            f"{reverse['divergences_total']:.0f} divergences, {reverse['apply_errors_total']:.0f} apply errors"
        )
        _show_pgbench(console, summary, history)
        console.rule("COMPLETE UPGRADE: the fallback period ends")
        story.complete()
        console.print(result_table(console_query(admin, "SHOW UPGRADE HISTORY")))
        console.print(
            result_table(
                columns(console_query(admin, "SHOW SERVERS"), SERVERS_COLUMNS),
                caption="the demo's own session, still open, is served by Charles",
            )
        )
    _show_outcome(console, pause, summary, len(problems))


class _Extras:
    """The panels under the upgrade's: the reverse replay, SHOW STATS, SHOW SERVERS, /metrics, Bob's lag."""

    def __init__(self, admin: psycopg.Connection[Any], alice: psycopg.Connection[Any], metrics_port: int) -> None:
        self.admin = admin
        self.alice = alice
        self.metrics_port = metrics_port
        self._previous: MetricsSample | None = None

    def __call__(self) -> Sequence[RenderableType]:
        metrics = scrape_metrics(self.metrics_port)
        panels = [
            result_table(console_query(self.admin, "SHOW STATS")),
            result_table(columns(console_query(self.admin, "SHOW SERVERS"), SERVERS_COLUMNS)),
            metrics_table(metrics, self._previous),
            result_table(replication(self.alice, "replica (Bob) lag behind Alice (the copy pauses its replay)")),
        ]
        reverse = replay_metrics(self.metrics_port, f"{DATABASE}@reverse")
        if reverse:  # after the cutover: Charles's writes on their way back to Alice
            panels.insert(0, _reverse_table(reverse))
        self._previous = metrics
        return panels


def _reverse_table(series: dict[str, float]) -> Table:
    """The reverse replay (Charles to Alice) as /metrics has it: SHOW REPLAY does not list the reverse log."""
    table = Table(title=f'pgleap_replay_* {{database="{DATABASE}@reverse"}}', box=box.SIMPLE_HEAD, title_justify="left")
    names = (
        "running",
        "applied_position",
        "lag_transactions",
        "applied_total",
        "divergences_total",
        "apply_errors_total",
    )
    for name in names:
        table.add_column(name, justify="right")
    table.add_row(*(f"{series.get(name, 0):.0f}" for name in names))
    return table


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


def _server(lab_server: LabServer) -> ServerConfig:
    """A lab server's superuser on the demo's database."""
    return ServerConfig(lab_server.host, lab_server.port, DATABASE, lab_server.superuser, lab_server.password)


def demo_config(cast: Cast, state: Path) -> str:
    """The demo's pgleap.toml: database `app` on Alice, its replica Bob, its target Charles, short validation."""
    bob = cast.bob
    upgrade = [
        f'replica_host = "{bob.host}"',
        f"replica_port = {bob.port}",
        f'replica_user = "{bob.superuser}"',
        f'replica_password = "{bob.password}"',
        "[auto_upgrade.validation]",
        f'validation_duration = "{VALIDATION_SECONDS}s"',
        "compare_results = true",
        f"sample_rate = {SAMPLE_RATE}",
        "[auto_upgrade.sync]",
        "parallel_workers = 2",  # the machine's two cores
    ]
    return render_config(
        {DATABASE: _server(cast.alice)},
        admin=(ADMIN_USER, ADMIN_PASSWORD),
        extra=f'state_path = "{state / "pgleap-state.db"}"\nchangelog_path = "{state / "pgleap-changes.db"}"',
        targets={DATABASE: _server(cast.charles)},
        upgrade_extra="\n".join(upgrade),
    )


@contextmanager
def _start_proxy(cast: Cast, state: Path) -> Iterator[ProxyThread]:
    """pgleap on a free port in front of Alice, with the demo's config; stopped on exit."""
    proxy = ProxyThread(parse_config(demo_config(cast, state)))
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


def _history_rows(server: LabServer) -> int:
    """pgbench_history's rows, read on the server itself."""
    return int(server.psql("SELECT count(*) FROM pgbench_history", dbname=DATABASE))


def _duplicates(cast: Cast) -> str:
    """pgbench_history rows present twice on Alice or Charles (a transaction applied twice shows there)."""
    sql = (
        "SELECT tid, bid, aid, delta, count(*), string_agg(mtime::text, ',') FROM pgbench_history "
        "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1 LIMIT 5"
    )
    found = {
        name: server.psql(sql, dbname=DATABASE).strip()
        for name, server in (("Alice", cast.alice), ("Charles", cast.charles))
    }
    return "; ".join(f"rows twice on {name}: {rows or 'none'}" for name, rows in found.items())


# ---------------------------------------------------------------------------- what is printed once


def _show_endpoints(console: Console, cast: Cast, proxy_port: int, metrics_port: int) -> None:
    table = Table(title="the cast", box=box.SIMPLE_HEAD)
    for column in ("name", "role", "server", "address", "note"):
        table.add_column(column)
    rows = [
        ("Alice", "source primary", cast.alice, "md5 auth, like 9.x servers; serves the application"),
        ("Bob", "streaming replica", cast.bob, "the copy reads from it, not from Alice"),
        ("Charles", "upgrade target", cast.charles, "empty; the upgrade fills it and moves clients to it"),
    ]
    for name, role, server, note in rows:
        table.add_row(name, role, f"PostgreSQL {server.install.version}", f"{HOST}:{server.port}", note)
    table.add_row(
        "pgleap", "proxy", "pgleap", f"{HOST}:{proxy_port}", f"clients connect here; metrics on :{metrics_port}/metrics"
    )
    console.print(table)
    console.print(
        f"\\[auto_upgrade] app: source Alice, replica Bob, target Charles; validation_duration {VALIDATION_SECONDS}s, "
        f"compare_results on (sample_rate {SAMPLE_RATE})"
    )


def _show_pgbench(console: Console, summary: PgbenchSummary, history: int) -> None:
    table = Table(title="pgbench through pgleap, across the cutover", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("result")
    table.add_column("value", justify="right")
    table.add_row("tps", f"{summary.tps:,.1f}")
    table.add_row("transactions processed", f"{summary.processed:,}")
    table.add_row("failed transactions", str(summary.failed))
    table.add_row("latency average", ms(summary.latency_ms))
    table.add_row("pgbench_history rows", f"{history:,} (one per TPC-B transaction: none lost)")
    console.print(table)


def _show_outcome(console: Console, pause: float, summary: PgbenchSummary, differing: int) -> None:
    table = Table(title="the upgrade in four numbers", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("cutover pause", f"{pause:.3f} s")
    table.add_row("pgbench failed transactions", str(summary.failed))
    table.add_row("pgbench transactions, source then target", f"{summary.processed:,}")
    table.add_row("tables differing, Charles vs Alice", str(differing))
    console.print(table)


def _show_psql_equivalents(console: Console, proxy_port: int, metrics_port: int) -> None:
    lines = [
        "# the same from a shell, while a pgleap runs (`pgleap run -c pgleap.toml` keeps one up):",
        "pgleap upgrade start -c pgleap.toml; pgleap status -c pgleap.toml; pgleap upgrade cutover -c pgleap.toml",
        (
            f"PGPASSWORD={ADMIN_PASSWORD} psql 'host={HOST} port={proxy_port} dbname=pgleap user={ADMIN_USER}' "
            "-c 'SHOW UPGRADE STATUS' -c 'SHOW UPGRADE HISTORY' -c 'SHOW REPLAY'"
        ),
        f"curl -s http://{HOST}:{metrics_port}/metrics | grep '^pgleap_'",
    ]
    console.print(Panel(Text("\n".join(lines)), title="try it yourself", title_align="left"))
