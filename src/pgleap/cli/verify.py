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
    import psycopg
    from rich.console import Console
    from rich.table import Table

    from pgleap.config import load_config
    from pgleap.errors import PgleapError

    console = Console()
    try:
        cfg = load_config(config)
    except PgleapError as exc:
        console.print(f"[red]pgleap: {exc}[/red]")
        raise typer.Exit(2) from exc
    host = "127.0.0.1" if cfg.proxy.listen_addr in ("0.0.0.0", "::", "") else cfg.proxy.listen_addr
    port = port or cfg.proxy.listen_port
    if not port:
        console.print("[red]pgleap: the config lets pgleap pick its port at start (listen_port = 0): give --port[/red]")
        raise typer.Exit(2)
    prefix = f"{database}:" if database else ""
    statements = [f"VERIFY TABLE '{prefix}{t.replace(chr(39), chr(39) * 2)}'" for t in tables] or ["VERIFY ALL TABLES"]
    try:
        with psycopg.connect(
            host=host,
            port=port,
            dbname="pgleap",
            user=cfg.admin.user,
            password=cfg.admin.password,
            autocommit=True,
            prepare_threshold=None,
        ) as conn:
            rows: list[dict[str, str | None]] = []
            for statement in statements:
                cur = conn.execute(statement)
                names = [c.name for c in cur.description or ()]
                rows += [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    except psycopg.Error as exc:
        console.print(f"[red]pgleap: {str(exc).strip()}[/red]")
        console.print(f"is pgleap running with {config}, with replay started (START REPLAY)?")
        raise typer.Exit(2) from exc
    table = Table("database", *_COLUMNS, "repairs", "clean", "seconds")
    for row in rows:
        clean = row["clean"] == "t"
        verdict = "[green]yes[/green]" if clean else "[red]NO[/red]"
        table.add_row(row["database"], *(row[c] or "" for c in _COLUMNS), row["repairs"], verdict, row["seconds"])
    console.print(table)
    unclean = [r for r in rows if r["clean"] != "t"]
    for row in unclean:
        console.print(f"[red]{row['table']}[/red] differs, e.g. keys {row['example_keys']}; see SHOW UPGRADE ERRORS")
    raise typer.Exit(1 if unclean else 0)
