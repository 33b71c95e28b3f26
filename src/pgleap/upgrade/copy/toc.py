"""The post-data entries of the schema dump, split into each table's own key builds and the rest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import asyncpg

# One `pg_restore -l` line: "dump_id; catalog_oid object_oid TYPE schema tag owner".
_LINE = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")

# Catalogs of the entries a table owns alone: indexes (pg_class) and PK/unique/exclusion constraints.
_PG_CLASS = 1259
_PG_CONSTRAINT = 2606

# Which table each index and constraint belongs to, read at S like the dump. The same from 9.0 on.
_INDEX_TABLES = "SELECT indexrelid::bigint, indrelid::bigint FROM pg_index"
_CONSTRAINT_TABLES = (
    "SELECT oid::bigint, conrelid::bigint FROM pg_constraint WHERE contype IN ('p', 'u', 'x') AND conrelid <> 0"
)


@dataclass(frozen=True)
class TocEntry:
    """One post-data entry: its `pg_restore -l` line (what `pg_restore -L` selects) and the table it builds on."""

    dump_id: int
    line: str
    table_oid: int | None  # set only for an index or key of a single table


@dataclass
class PostDataPlan:
    """Each table's key builds (by source table oid), and everything else, in dump order."""

    by_table: dict[int, list[TocEntry]] = field(default_factory=dict)
    rest: list[TocEntry] = field(default_factory=list)

    def entries_for(self, table_oid: int) -> list[TocEntry]:
        """The indexes and keys of one table (none for most small tables without keys)."""
        return self.by_table.get(table_oid, [])

    def rest_without(self, table_oids: set[int]) -> list[TocEntry]:
        """The entries left for the final pass: the rest, plus tables whose keys were not built on their own."""
        left = [e for oid, entries in self.by_table.items() if oid not in table_oids for e in entries]
        return sorted([*self.rest, *left], key=lambda e: e.dump_id)


def _owning_table(
    kind: str, catalog: int, oid: int, index_tables: dict[int, int], key_tables: dict[int, int]
) -> int | None:
    # Only plain INDEX and CONSTRAINT entries: "FK CONSTRAINT" needs the referenced table's key and
    # "INDEX ATTACH", triggers, rules, comments etc. are cheap and may depend on several tables.
    if kind.startswith("INDEX ") and not kind.startswith("INDEX ATTACH ") and catalog == _PG_CLASS:
        return index_tables.get(oid)
    if kind.startswith("CONSTRAINT ") and catalog == _PG_CONSTRAINT:
        return key_tables.get(oid)
    return None


def parse_listing(listing: str, index_tables: dict[int, int], key_tables: dict[int, int]) -> PostDataPlan:
    """A PostDataPlan from `pg_restore -l --section=post-data` and the index/key -> table maps."""
    plan = PostDataPlan()
    for raw in listing.splitlines():
        match = _LINE.match(raw)
        if match is None:  # comments (";") and blank lines
            continue
        dump_id, catalog, oid, kind = int(match[1]), int(match[2]), int(match[3]), match[4]
        table = _owning_table(kind, catalog, oid, index_tables, key_tables)
        entry = TocEntry(dump_id, raw, table)
        if table is None:
            plan.rest.append(entry)
        else:
            plan.by_table.setdefault(table, []).append(entry)
    return plan


async def owning_tables(conn: asyncpg.Connection) -> tuple[dict[int, int], dict[int, int]]:
    """index oid -> table oid, and key constraint oid -> table oid, on the read side at S."""
    indexes = {int(r[0]): int(r[1]) for r in await conn.fetch(_INDEX_TABLES)}
    keys = {int(r[0]): int(r[1]) for r in await conn.fetch(_CONSTRAINT_TABLES)}
    return indexes, keys
