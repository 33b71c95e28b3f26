"""`pgleap copy` and `pgleap replica create`: thin commands over the copy engine, with a rich progress display."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from pgleap.config import Config, UpgradeConfig
    from pgleap.upgrade.copy import CopyJob, CopyReport

# Every `pgleap` command imports this module (cli/main.py registers its commands), so the copy engine,
# asyncpg, rich and the state store are imported inside the commands that use them, not here.


@functools.cache
def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _fail(message: str) -> None:
    _console().print(f"[red]pgleap: {message}[/red]", markup=True, highlight=False)
    raise typer.Exit(code=2)


def _pick(config: Path, database: str | None) -> tuple[Config, UpgradeConfig]:
    from pgleap.config import load_config

    cfg = load_config(config)
    return cfg, _entry(cfg, config, database)


def _entry(cfg: Config, config: Path, database: str | None) -> UpgradeConfig:
    from pgleap.errors import PgleapError

    if database is None:
        if len(cfg.upgrades) != 1:
            names = ", ".join(u.database for u in cfg.upgrades)
            raise PgleapError(f"{config} has several [[auto_upgrade]] entries ({names}); pick one with --database")
        return cfg.upgrades[0]
    upgrade = cfg.upgrade_for(database)
    if upgrade is None:
        raise PgleapError(f"{config} has no [[auto_upgrade]] entry with database = {database!r}")
    return upgrade


async def _display(job: CopyJob, progress: Progress) -> None:
    from pgleap.upgrade.copy import table_progress, total_progress

    overall: TaskID = progress.add_task("total", total=None)
    tasks: dict[str, TaskID] = {}
    while True:
        total = total_progress(job.store, job.database, job.live)
        progress.update(
            overall,
            description=f"total [{job.step}] {total.tables_done}/{total.tables_total} tables",
            completed=total.bytes,
            total=max(total.est_bytes, total.bytes) or None,
        )
        for table in table_progress(job.store, job.database, job.live):
            if table.status == "pending":
                continue
            if table.table not in tasks:
                tasks[table.table] = progress.add_task(table.table, total=max(table.est_bytes, 1))
            progress.update(
                tasks[table.table],
                completed=table.bytes if table.status != "done" else max(table.bytes, table.est_bytes),
                total=max(table.est_bytes, table.bytes, 1),
                visible=table.status != "done",
            )
        await asyncio.sleep(0.5)


async def _run(job: CopyJob, show_progress: bool) -> CopyReport:
    if not show_progress:
        return await job.run()
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console(), transient=False) as progress:
        display = asyncio.create_task(_display(job, progress))
        try:
            return await job.run()
        finally:
            display.cancel()
            await asyncio.gather(display, return_exceptions=True)


def _print_report(report: CopyReport) -> None:
    from pgleap.upgrade.copy import format_schema_errors

    mb = report.bytes / 1e6
    typer.echo(
        f"copied database {report.database} ({report.mode}, run {report.run_id}"
        f"{', resumed' if report.resumed else ''}) at S = {report.snapshot}"
    )
    if report.restart_reason:
        typer.echo(f"started over: {report.restart_reason}")
    rate = f"{report.rows / report.seconds:,.0f} rows/s, {mb / report.seconds:.1f} MB/s" if report.seconds else ""
    typer.echo(f"{report.rows:,} rows, {mb:.1f} MB in {report.seconds:.1f}s ({rate})")
    typer.echo("steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.step_seconds.items()))
    if report.schema_errors:
        typer.echo(
            f"{len(report.schema_errors)} object(s) rejected by the target and skipped:\n"
            + format_schema_errors(report.schema_errors)
        )


def copy_command(
    config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
    database: str | None = typer.Option(
        None, "--database", help="which auto_upgrade entry (by database), if there are several"
    ),
    state: Path | None = typer.Option(None, "--state", help="state store file (default: pgleap.state_path)"),
    workers: int | None = typer.Option(
        None, "--workers", help="parallel COPY sessions (default: sync.parallel_workers)"
    ),
    split_threshold_mb: float | None = typer.Option(
        None, help="split tables larger than this (sync.split_threshold_mb)"
    ),
    chunk_mb: float | None = typer.Option(None, help="size of one range of a split table (sync.chunk_mb)"),
    split_policy: str | None = typer.Option(
        None,
        help="makespan: split a table above the threshold only when that shortens the estimated copy; "
        "always: split every one (sync.split_policy)",
    ),
    on_schema_error: str | None = typer.Option(None, help="stop or skip (sync.on_schema_error)"),
    no_roles: bool = typer.Option(False, "--no-roles", help="do not copy roles (overrides sync.copy_roles)"),
    text: bool = typer.Option(False, "--text", help="text COPY for every table (overrides sync.copy_binary)"),
    restart: bool = typer.Option(False, "--restart", help="start over even if an interrupted run could resume"),
    bindir: Path | None = typer.Option(None, "--bindir", help="directory with the target major's pg_dump/pg_restore"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="rich progress display"),
    log_level: str = typer.Option("WARNING", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Copy schema, data and sequences of a source database to its target at one snapshot S (resumable)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    from pgleap.errors import PgleapError
    from pgleap.store import StateStore
    from pgleap.upgrade.copy import CopyJob
    from pgleap.upgrade.copy.model import copy_options

    try:
        cfg, upgrade = _pick(config, database)
        sync = upgrade.sync
        options = copy_options(
            sync,
            parallel_workers=workers,
            split_threshold_bytes=None if split_threshold_mb is None else int(split_threshold_mb * 1024 * 1024),
            chunk_bytes=None if chunk_mb is None else max(1, int(chunk_mb * 1024 * 1024)),
            split_policy=split_policy,
            on_schema_error=on_schema_error,
            copy_roles=False if no_roles else None,
            binary=False if text else None,
        )
        store = StateStore(state or cfg.proxy.state_path)
        job = CopyJob(upgrade, store, options, bindir=bindir, restart=restart)
        report = uvloop.run(_run(job, progress and sys.stderr.isatty()))
    except (PgleapError, ValueError) as exc:
        _fail(str(exc))
    _print_report(report)


replica_app = typer.Typer(help="Streaming replicas (Bob) the copy reads from.", no_args_is_help=True)


@replica_app.command("create")
def replica_create(
    config: Path = typer.Option(..., "-c", "--config", help="TOML config file (source_* says where Alice is)"),
    datadir: Path = typer.Option(..., "--datadir", help="new, empty data directory for the replica"),
    port: int = typer.Option(..., "--port", help="port the replica listens on"),
    host: str = typer.Option("127.0.0.1", "--host", help="address the replica listens on (and only there)"),
    database: str | None = typer.Option(
        None, "--database", help="which auto_upgrade entry (by database), if there are several"
    ),
    bindir: Path | None = typer.Option(
        None, "--bindir", help="server binaries (postgres, pg_ctl) of the source's major; its pg_basebackup if any"
    ),
    timeout: float = typer.Option(120, "--timeout", help="seconds to wait for the replica to start and stream"),
) -> None:
    """Provision Bob from Alice with pg_basebackup, configure it as a standby, start it, wait until it streams."""
    from pgleap.errors import PgleapError
    from pgleap.lab.osuser import as_server_user
    from pgleap.upgrade.copy.provision import provision_replica

    try:
        _, upgrade = _pick(config, database)
        replica = asyncio.run(
            provision_replica(upgrade.source, datadir, port, bindir=bindir, host=host, timeout=timeout)
        )
    except PgleapError as exc:
        _fail(str(exc))
    typer.echo(
        f"replica streaming from {upgrade.source.describe()}: {replica.server.describe()} "
        f"(PostgreSQL {replica.version_num}, data in {replica.datadir}, log {replica.logfile})"
    )
    typer.echo(
        f'add to the [[auto_upgrade]] entry: replica_host = "{replica.server.host}", '
        f"replica_port = {replica.server.port}"
    )
    stop = as_server_user([str(replica.bindir / "pg_ctl"), "stop", "-D", str(replica.datadir)])
    typer.echo("stop it with: " + " ".join(stop))
