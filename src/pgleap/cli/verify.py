"""`pgleap verify [TABLE...]`: ask the running pgleap (its admin console) to verify tables, print the result.

Verification compares source and target at one point of the change stream, which only the process that
replays the log can hold; so this command is a client of that process, like psql on its console.
"""

from __future__ import annotations

from pathlib import Path

import typer

_COLUMNS = ("table", "source_rows", "differing_chunks", "missing_on_target", "extra_on_target", "different")


def verify_command(
    tables: list[str] = typer.Argument(None, help="schema.table names (default: every table)"),
    config: Path = typer.Option(..., "-c", "--config", help="the TOML config of the running pgleap"),
    database: str | None = typer.Option(None, "--database", help="the database of the auto_upgrade entry, if several"),
    port: int | None = typer.Option(None, "--port", help="the console's port (default: listen_port of the config)"),
) -> None:
    """Verify tables of a running upgrade (chunked checksums, bisected to rows); re-sync per resync_on_error."""
    from rich.console import Console
    from rich.table import Table

    from pgleap.cli.console import admin_session, rows

    console = Console()
    prefix = f"{database}:" if database else ""
    statements = [f"VERIFY TABLE '{prefix}{t.replace(chr(39), chr(39) * 2)}'" for t in tables] or ["VERIFY ALL TABLES"]
    found: list[dict[str, str | None]] = []
    with admin_session(config, port, console) as conn:
        for statement in statements:
            found += rows(conn, statement, console)
    table = Table("database", *_COLUMNS, "repairs", "clean", "seconds")
    for row in found:
        clean = row["clean"] == "t"
        verdict = "[green]yes[/green]" if clean else "[red]NO[/red]"
        table.add_row(row["database"], *(row[c] or "" for c in _COLUMNS), row["repairs"], verdict, row["seconds"])
    console.print(table)
    unclean = [r for r in found if r["clean"] != "t"]
    for row in unclean:
        console.print(f"[red]{row['table']}[/red] differs, e.g. keys {row['example_keys']}; see SHOW UPGRADE ERRORS")
    raise typer.Exit(1 if unclean else 0)
