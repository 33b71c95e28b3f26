"""The CLI as a client of a running pgleap's admin console: the commands that need the process that captures
and replays (verify, status, upgrade ...) send it console statements, as psql would."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg
    from rich.console import Console


def fail(console: Console, message: str) -> NoReturn:
    """Print the error in red and exit 2."""
    console.print(f"[red]pgleap: {message}[/red]")
    raise typer.Exit(2)


@contextmanager
def admin_session(config: Path, port: int | None, console: Console) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the console of the pgleap running with `config`; exits 2 saying why when there is none."""
    import psycopg

    from pgleap.config import load_config
    from pgleap.errors import PgleapError

    try:
        cfg = load_config(config)
    except PgleapError as exc:
        fail(console, str(exc))
    host = "127.0.0.1" if cfg.proxy.listen_addr in ("0.0.0.0", "::", "") else cfg.proxy.listen_addr
    port = port or cfg.proxy.listen_port
    if not port:
        fail(console, "the config lets pgleap pick its port at start (listen_port = 0): give --port")
    try:
        conn = psycopg.connect(
            host=host,
            port=port,
            dbname="pgleap",
            user=cfg.admin.user,
            password=cfg.admin.password,
            autocommit=True,
            prepare_threshold=None,  # the console takes simple queries only
        )
    except psycopg.Error as exc:
        fail(console, f"{str(exc).strip()}; is pgleap running with {config}?")
    with conn:
        yield conn


def rows(conn: psycopg.Connection[Any], statement: str, console: Console) -> list[dict[str, Any]]:
    """One console statement's rows by column name; a refused statement exits 2 with the console's message."""
    import psycopg

    try:
        cur = conn.execute(statement)
    except psycopg.Error as exc:
        fail(console, str(exc).strip())
    names = [c.name for c in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
