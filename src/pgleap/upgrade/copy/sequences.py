"""Sequences, set last on the target from the PRIMARY: a 9.x standby reads up to 32 values ahead."""

from __future__ import annotations

import asyncpg

from pgleap.upgrade.compat import Facts
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.copy.connect import qualified, quote_literal


async def copy_sequences(primary: asyncpg.Connection, primary_facts: Facts, target: asyncpg.Connection) -> int:
    """setval every source sequence on the target to the primary's current value; returns how many."""
    names = await primary.fetch(sql.sequences_sql(primary_facts))
    values = []
    for schema, name in names:
        row = await primary.fetchrow(sql.sequence_value_sql(qualified(schema, name)))
        values.append((qualified(schema, name), int(row[0]), bool(row[1])))
    async with target.transaction():
        for name, last_value, is_called in values:
            await target.execute(f"SELECT setval({quote_literal(name)}, {last_value}, {is_called})")
    return len(values)
