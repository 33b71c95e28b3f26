"""Large objects: read at S, written to the target with the same OIDs and owners, in one transaction."""

from __future__ import annotations

import asyncpg

from pgleap.upgrade.compat import Facts
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.copy.connect import quote_ident


async def copy_large_objects(source: asyncpg.Connection, facts: Facts, target: asyncpg.Connection) -> int:
    """Copy every large object; idempotent (objects already on the target are replaced). Returns how many."""
    objects = await source.fetch(sql.large_objects_sql(facts))
    if not objects:
        return 0
    async with target.transaction():
        # One transaction: a crash leaves none of them, and a rerun starts clean.
        existing = {r[0] for r in await target.fetch("SELECT oid::bigint FROM pg_largeobject_metadata")}
        for oid, owner in objects:
            data = await source.fetchval(sql.large_object_data_sql(facts), oid)
            if oid in existing:
                await target.execute("SELECT lo_unlink($1::bigint::oid)", oid)
            await target.execute("SELECT lo_from_bytea($1::bigint::oid, $2)", oid, data)
            await target.execute(f"ALTER LARGE OBJECT {int(oid)} OWNER TO {quote_ident(owner)}")
    return len(objects)
