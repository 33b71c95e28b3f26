"""The target database: created by the copy, checked empty, dropped and recreated when a copy starts over."""

from __future__ import annotations

import logging
from dataclasses import replace

import asyncpg

from pgleap.config import ServerConfig
from pgleap.upgrade.compat import facts_for
from pgleap.upgrade.copy.connect import connect, quote_ident, quote_literal, version_num
from pgleap.upgrade.copy.errors import TargetNotEmptyError

log = logging.getLogger(__name__)

_USER_OBJECTS = (
    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast' "
    "AND n.nspname !~ '^pg_temp_'"
)


async def prepare_target(target: ServerConfig, encoding: str, *, recreate: bool) -> int:
    """Make sure the target database exists and is empty (dropped and recreated when `recreate`); its oid."""
    admin = await connect(replace(target, database="postgres"), role="target")
    try:
        facts = facts_for(await version_num(admin))
        exists = await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", target.database)
        if exists and recreate:
            log.warning("dropping target database %s to start the copy over", target.describe())
            await admin.execute(facts.drop_database_sql(quote_ident(target.database)))
            exists = False
        if not exists:
            await admin.execute(
                f"CREATE DATABASE {quote_ident(target.database)} TEMPLATE template0 ENCODING {quote_literal(encoding)}"
            )
        # Replay compares it with the database it connects to: one created again since is another copy's.
        oid = int(await admin.fetchval("SELECT oid FROM pg_database WHERE datname = $1", target.database))
    finally:
        await admin.close()
    if exists:
        await _refuse_foreign_objects(target)
    return oid


async def _refuse_foreign_objects(target: ServerConfig) -> None:
    conn = await connect(target, role="target")
    try:
        count = int(await conn.fetchval(_USER_OBJECTS))
    finally:
        await conn.close()
    if count:
        raise TargetNotEmptyError(
            f"target database {target.describe()} already holds {count} relations that no pgleap copy of this "
            f"database created; drop it (DROP DATABASE {quote_ident(target.database)}) or point target_database "
            f"at a new name, then run the copy again"
        )


async def source_encoding(conn: asyncpg.Connection) -> str:
    """The source database's encoding name, for CREATE DATABASE on the target."""
    return str(
        await conn.fetchval("SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = current_database()")
    )
