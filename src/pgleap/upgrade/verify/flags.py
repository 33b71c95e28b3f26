"""What a re-sync flag stands for, read from the source's catalog, and which flags a clean check clears.

Replay keys a flag by the name as the statement wrote it (journal.py). A bare name stands for every table of
that name in any schema (the record's search_path is not resolved), a qualified one for that table; either
with its partitions and inheritors at any depth, which a write through it also changes. A required flag that
reaches anything verification cannot check (a view, a foreign table, a table it does not list, nothing at
all) stands for every table; `EVERY_TABLE` does so by itself. A flag that is not required (the target may
only compute other values there) stands for what can be checked, possibly nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from pgleap.upgrade.compat.catalog import inheritors_sql
from pgleap.upgrade.copy.model import Table
from pgleap.upgrade.replay.journal import EVERY_TABLE, ApplyJournal


@dataclass(frozen=True)
class Resolved:
    """The relations a name reaches in the catalog."""

    tables: list[Table]  # the listed tables among them
    named: int  # relations the name itself matches (several: a bare name in several schemas)
    complete: bool  # every one holding rows is listed (a partitioned parent holds none)


async def resolve(source: asyncpg.Connection, tables: list[Table], name: str) -> Resolved:
    """The listed `tables` a name reaches, with its partitions and inheritors."""
    rows = await source.fetch(inheritors_sql(), name)
    listed = {t.oid for t in tables}
    reached = {int(oid) for oid, _, _ in rows}
    return Resolved(
        [t for t in tables if t.oid in reached],
        len({int(oid) for oid, _, named in rows if named}),
        all(int(oid) in listed or kind == "p" for oid, kind, _ in rows),
    )


async def stands_for(source: asyncpg.Connection, tables: list[Table], name: str, *, required: bool) -> list[Table]:
    """The tables a flag's check must find clean before it is cleared (see the module's docstring)."""
    if name == EVERY_TABLE:
        return tables
    found = await resolve(source, tables, name)
    if required and not (found.tables and found.complete):
        return tables
    return found.tables


async def clear_covered(
    source: asyncpg.Connection,
    tables: list[Table],
    journal: ApplyJournal,
    database: str,
    flags: dict[str, int],
    clean: set[int],
) -> list[str]:
    """Clear each of `flags` (as they stood before the check began) whose tables are all among the `clean`
    oids; the names no longer flagged at all. A flag set again since (a later position) stays.

    What a flag stands for is read again here, not taken from before the check: replay may have made it
    required meanwhile (a skip), and a required view stands for every table, not for nothing.
    """
    required = set(journal.required_resyncs(database))
    gone = []
    for name, at in flags.items():
        needed = await stands_for(source, tables, name, required=name in required)
        if clean.issuperset(t.oid for t in needed) and journal.clear_resync(database, name, through=at):
            gone.append(name)
    return gone
