"""Materialized views: a schema-only dump leaves them unpopulated; refresh those populated on the source."""

from __future__ import annotations

import asyncpg

from pgleap.store import SchemaErrorRecord
from pgleap.upgrade.compat import Facts
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.copy.connect import qualified


async def refresh_matviews(
    source: asyncpg.Connection, facts: Facts, target: asyncpg.Connection
) -> list[SchemaErrorRecord]:
    """REFRESH each populated view; views reading other views are retried until their inputs are ready."""
    query = sql.matviews_sql(facts)
    if query is None:
        return []
    pending = [qualified(s, n) for s, n in await source.fetch(query)]
    errors: dict[str, str] = {}
    while pending:
        failed = []
        for name in pending:
            try:
                await target.execute(f"REFRESH MATERIALIZED VIEW {name}")
            except asyncpg.PostgresError as exc:
                failed.append(name)
                errors[name] = str(exc)
        if len(failed) == len(pending):
            break
        pending = failed
    return [
        SchemaErrorRecord(
            section="post-data",
            object=f"MATERIALIZED VIEW {name}",
            error=errors[name],
            definition=f"REFRESH MATERIALIZED VIEW {name}",
        )
        for name in pending
    ]
