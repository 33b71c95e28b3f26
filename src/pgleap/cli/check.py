"""`pgleap check`: what the target major will reject or answer differently, before anything is copied."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import typer

from pgleap.config import ServerConfig

# cli/main.py imports this module for every command: the check engine is imported inside the command.


def _server(url: str) -> ServerConfig:
    """postgresql://user:password@host:port/database as a ServerConfig."""
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql") or not parsed.hostname:
        raise typer.BadParameter(f"{url!r} is not a postgresql://user:password@host:port/database URL")
    return ServerConfig(
        parsed.hostname,
        parsed.port or 5432,
        unquote(parsed.path.lstrip("/")) or "postgres",
        unquote(parsed.username or "postgres"),
        unquote(parsed.password) if parsed.password is not None else None,
    )


def _fail(message: str) -> None:
    typer.secho(f"pgleap: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def check_command(
    config: Path | None = typer.Option(None, "-c", "--config", help="TOML config (source_* and target_* of an entry)"),
    database: str | None = typer.Option(None, "--database", help="the auto_upgrade entry (by database), if several"),
    source: str | None = typer.Option(
        None, "--source", help="source URL instead of a config: postgresql://u:p@h:port/db"
    ),
    target: str | None = typer.Option(None, "--target", help="target URL instead of the config's target_*"),
    target_major: int | None = typer.Option(
        None, "--target-major", help="check against a major only (no target server: extensions are not checked)"
    ),
    queries: Path | None = typer.Option(
        None, "--queries", help="workload check: a SQL file of the application's queries, EXPLAINed on the target"
    ),
    from_console: bool = typer.Option(
        False,
        "--from-console",
        help="workload check: the queries the running pgleap of -c captured (SHOW UPGRADE QUERY TEXTS)",
    ),
    port: int | None = typer.Option(
        None, "--port", help="with --from-console: the console's port (default: listen_port)"
    ),
    no_trial: bool = typer.Option(
        False, "--no-trial", help="run the workload in the target database itself (it has the schema already)"
    ),
    output_format: str = typer.Option("text", "--format", help="text or json (on stdout)"),
    html: Path | None = typer.Option(None, "--html", help="also write a self-contained HTML report to this file"),
    bindir: Path | None = typer.Option(None, "--bindir", help="the target major's pg_dump/pg_restore (trial restore)"),
) -> None:
    """Report each incompatibility of the source with the target major: severity, objects, fix, release note.

    Exits 1 when there is an error-level finding or a query that fails on the target, else 0.
    """
    import asyncio

    from rich.console import Console

    from pgleap.errors import PgleapError
    from pgleap.upgrade.check.html import render_html
    from pgleap.upgrade.check.report import print_text, to_json
    from pgleap.upgrade.check.run import run_check
    from pgleap.upgrade.check.workload import read_queries

    if output_format not in ("text", "json"):
        _fail(f"--format {output_format}: use text or json")
    try:
        source_cfg, target_cfg = _servers(config, database, source, target)
        if target_major is not None:
            target_cfg = None  # the major alone was asked for
        workload: list[str | tuple[str, int]] | None = list(read_queries(queries)) if queries else None
        if from_console:
            if config is None:
                raise typer.BadParameter("--from-console needs -c/--config: the config of the running pgleap")
            captured = console_texts(config, database, port)
            if not captured:
                typer.secho(
                    "pgleap: the running pgleap lists no captured query yet (is result comparison on, and capture "
                    "started?): no workload check from the console",
                    fg=typer.colors.YELLOW,
                    err=True,
                )
            workload = (workload or []) + captured
        report = asyncio.run(
            run_check(
                source_cfg, target_cfg, target_major=target_major, queries=workload, trial=not no_trial, bindir=bindir
            )
        )
    except (PgleapError, OSError) as exc:
        _fail(str(exc))
    if output_format == "json":
        typer.echo(to_json(report))
    else:
        print_text(report, Console())
    if html is not None:
        html.write_text(render_html(report))
        if output_format == "text":
            typer.echo(f"HTML report written to {html}")
    errors = report.counts()["error"] or report.failing_queries
    raise typer.Exit(1 if errors else 0)


def console_texts(config: Path, database: str | None, port: int | None) -> list[str | tuple[str, int]]:
    """(text, count) of every captured fingerprint the running pgleap lists (its reads, the entry's writes)."""
    from rich.console import Console

    from pgleap.cli.console import admin_session, rows
    from pgleap.cli.copy import _pick
    from pgleap.upgrade.check.captured import CapturedText, texts_for_check

    # The writes of the entry checked only: another database's would only fail on this source too.
    _cfg, upgrade = _pick(config, database)
    errors = Console(stderr=True)
    with admin_session(config, port, errors) as conn:
        found = rows(conn, "SHOW UPGRADE QUERY TEXTS", errors)
    texts = [
        CapturedText(r["fingerprint"], r["source"], r["database"], int(r["count"]), r["example"])
        for r in found
        if r["example"]
    ]
    return list(texts_for_check(texts, upgrade.database))


def _servers(
    config: Path | None, database: str | None, source: str | None, target: str | None
) -> tuple[ServerConfig, ServerConfig | None]:
    if config is not None:
        from pgleap.cli.copy import _pick

        _cfg, upgrade = _pick(config, database)
        return (
            _server(source) if source else upgrade.source,
            _server(target) if target else upgrade.target,
        )
    if source is None:
        raise typer.BadParameter("give -c/--config or --source")
    return _server(source), _server(target) if target else None
