"""`pgleap status` and `pgleap upgrade start|cutover|rollback|complete`: the upgrade's commands, sent to the
running pgleap's console (START UPGRADE, INITIATE CUTOVER, ROLLBACK UPGRADE, COMPLETE UPGRADE)."""

from __future__ import annotations

from pathlib import Path

import typer

upgrade_app = typer.Typer(help="Drive the upgrade of a running pgleap.", no_args_is_help=True)

_CONFIG = typer.Option(..., "-c", "--config", help="the TOML config of the running pgleap")
_PORT = typer.Option(None, "--port", help="the console's port (default: listen_port of the config)")
# What status shows first, in this order; every other column follows.
_FIRST = ("phase", "phase_since", "phase_reason", "activity", "blocked_by", "last_error", "routed_to", "last_pause_s")


def status_command(config: Path = _CONFIG, port: int | None = _PORT) -> None:
    """Where each database's upgrade stands: phase, why, what it does, what blocks cutover, lag, validation."""
    from rich.console import Console
    from rich.table import Table

    from pgleap.cli.console import admin_session, rows

    console = Console()
    with admin_session(config, port, console) as conn:
        found = rows(conn, "SHOW UPGRADE STATUS", console)
    for row in found:
        table = Table(title=f"database {row['database']}", show_header=False)
        keys = [*_FIRST, *(k for k in row if k not in _FIRST and k != "database")]
        for key in keys:
            table.add_row(key, "" if row.get(key) is None else str(row[key]))
        console.print(table)


def _send(config: Path, port: int | None, statement: str) -> None:
    from rich.console import Console

    from pgleap.cli.console import admin_session, rows

    console = Console()
    with admin_session(config, port, console) as conn:
        for row in rows(conn, statement, console):
            console.print(row.get("note", row))


@upgrade_app.command("start")
def start(config: Path = _CONFIG, port: int | None = _PORT) -> None:
    """START UPGRADE: capture, copy, catch-up and mirroring up to cutover_ready, by itself."""
    _send(config, port, "START UPGRADE")


@upgrade_app.command("cutover")
def cutover(
    config: Path = _CONFIG,
    port: int | None = _PORT,
    force: bool = typer.Option(False, "--force", help="even when a gate does not hold"),
) -> None:
    """INITIATE CUTOVER: clients to the target in a short pause (refused, naming the gate, unless ready)."""
    _send(config, port, "INITIATE CUTOVER FORCE" if force else "INITIATE CUTOVER")


@upgrade_app.command("rollback")
def rollback(config: Path = _CONFIG, port: int | None = _PORT) -> None:
    """ROLLBACK UPGRADE: before cutover abandon it; after it, clients back to the source, losing nothing."""
    _send(config, port, "ROLLBACK UPGRADE")


@upgrade_app.command("complete")
def complete(config: Path = _CONFIG, port: int | None = _PORT) -> None:
    """COMPLETE UPGRADE: end the fallback period; the source is no longer written."""
    _send(config, port, "COMPLETE UPGRADE")
