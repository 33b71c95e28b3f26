"""asyncpg connections to the servers of one upgrade, with the session settings the copy relies on."""

from __future__ import annotations

import asyncpg

from pgleap.config import ServerConfig
from pgleap.upgrade.copy.errors import CopyError

CONNECT_TIMEOUT = 10.0


async def connect(
    server: ServerConfig, *, database: str | None = None, role: str, settings: dict[str, str] | None = None
) -> asyncpg.Connection:
    """Open one connection; `role` (source, replica, target) names the server in errors."""
    try:
        return await asyncpg.connect(
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password,
            database=database or server.database,
            timeout=CONNECT_TIMEOUT,
            server_settings=settings or {},
            # No prepared-statement cache: copy sessions run one-off SQL.
            statement_cache_size=0,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        where = f"{server.user}@{server.host}:{server.port}/{database or server.database}"
        raise CopyError(
            f"cannot connect to the {role} ({where}): {exc}; check it is running and that "
            f"pg_hba.conf admits this host and user"
        ) from exc


async def version_num(conn: asyncpg.Connection) -> int:
    """SHOW server_version_num as an int."""
    return int(await conn.fetchval("SHOW server_version_num"))


def quote_ident(name: str) -> str:
    """Double-quote an identifier (always: cheaper than deciding, and correct for any name)."""
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    """schema.name, both quoted."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def quote_literal(value: str) -> str:
    """An SQL string literal (standard_conforming_strings on)."""
    return "'" + value.replace("'", "''") + "'"
