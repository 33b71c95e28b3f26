"""Read the source tables at S and cut them into chunks: whole tables, key ranges or ctid ranges."""

from __future__ import annotations

import math

import asyncpg

from pgleap.store import ChunkRecord
from pgleap.upgrade.compat import Facts, binary_safe
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.copy.connect import quote_ident
from pgleap.upgrade.copy.model import Column, CopyOptions, Table

BLOCK_SIZE = 8192


async def load_tables(conn: asyncpg.Connection, facts: Facts, *, allow_binary: bool) -> list[Table]:
    """Every source table with rows of its own, with columns, primary key and the COPY format to use."""
    integer_datetimes = (await conn.fetchval("SHOW integer_datetimes")) == "on"
    tables: list[Table] = []
    for schema, name, oid, persistence, pages, reltuples, is_partition, has_children in await conn.fetch(
        sql.tables_sql(facts)
    ):
        columns = tuple(Column(*row) for row in await conn.fetch(sql.columns_sql(facts), oid))
        key_rows = await conn.fetch(sql.primary_key_sql(facts), oid)
        binary = allow_binary and all(
            binary_safe(c.type_name, c.type_schema, c.element_name, integer_datetimes=integer_datetimes)
            for c in columns
        )
        tables.append(
            Table(
                schema=schema,
                name=name,
                oid=oid,
                persistence=persistence,
                pages=pages,
                reltuples=reltuples,
                is_partition=is_partition,
                has_children=has_children,
                columns=columns,
                key=tuple(r[0] for r in key_rows),
                key_types=tuple(r[1] for r in key_rows),
                binary=binary,
            )
        )
    return tables


def _flags(table: Table) -> str:
    flags = []
    if not table.key:
        flags.append("no_pk")  # no key to compare rows by: later verification must look at it
    if table.unlogged:
        flags.append("unlogged")
    if not table.binary:
        flags.append("text_copy")
    if table.has_children:
        flags.append("inheritance_parent")
    return ",".join(flags)


async def plan_chunks(
    conn: asyncpg.Connection, facts: Facts, tables: list[Table], options: CopyOptions
) -> list[ChunkRecord]:
    """Chunks for every table; sizes come from the files at S, key bounds from the rows at S."""
    chunks: list[ChunkRecord] = []
    for table in tables:
        size = int(await conn.fetchval("SELECT pg_relation_size($1::bigint::oid)", table.oid))
        # A standby's unlogged tables are empty files; the catalog's estimate is what we have.
        est_bytes = float(max(size, table.pages * BLOCK_SIZE))
        pieces = max(1, math.ceil(est_bytes / options.chunk_bytes)) if est_bytes > options.split_threshold_bytes else 1
        flags = _flags(table)
        key = table.integer_key
        if pieces > 1 and key is not None and not table.unlogged:
            low, high = await conn.fetchrow(sql.key_bounds_sql(table.qualified, quote_ident(key)))
            if low is not None:
                step = max(1, math.ceil((high - low + 1) / pieces))
                bounds = list(range(low, high + 1, step))
                for i, lower in enumerate(bounds):
                    upper = bounds[i + 1] if i + 1 < len(bounds) else None
                    chunks.append(
                        ChunkRecord(
                            chunk_id=f"{table.label}#{i}",
                            kind="key",
                            lower=str(lower) if i else None,
                            upper=None if upper is None else str(upper),
                            est_rows=table.reltuples / len(bounds),
                            est_bytes=est_bytes / len(bounds),
                            schema_name=table.schema,
                            table_name=table.name,
                            flags=flags,
                        )
                    )
                continue
        if pieces > 1 and facts.has_tid_range_scan and not table.unlogged and size > 0:
            # Only where the server scans a ctid range directly (14+); older ones would read the
            # whole table for every chunk, so there a table without an integer key stays whole.
            pages = size // BLOCK_SIZE
            step = max(1, math.ceil(pages / pieces))
            starts = list(range(0, pages, step))
            for i, lower in enumerate(starts):
                upper = starts[i + 1] if i + 1 < len(starts) else None
                chunks.append(
                    ChunkRecord(
                        chunk_id=f"{table.label}#{i}",
                        kind="ctid",
                        lower=str(lower) if i else None,
                        upper=None if upper is None else str(upper),
                        est_rows=table.reltuples / len(starts),
                        est_bytes=est_bytes / len(starts),
                        schema_name=table.schema,
                        table_name=table.name,
                        flags=flags,
                    )
                )
            continue
        chunks.append(
            ChunkRecord(
                chunk_id=f"{table.label}#0",
                kind="table",
                lower=None,
                upper=None,
                est_rows=table.reltuples,
                est_bytes=est_bytes,
                schema_name=table.schema,
                table_name=table.name,
                flags=flags,
            )
        )
    # Biggest first, so the longest chunk does not start last and stretch the wall time.
    chunks.sort(key=lambda c: -c.est_bytes)
    return chunks


def chunk_predicate(table: Table, chunk: ChunkRecord) -> str | None:
    """The WHERE clause selecting a chunk's rows, or None for a whole table."""
    if chunk.kind == "table":
        return None
    if chunk.kind == "key":
        column = quote_ident(table.integer_key or "")
        parts = []
        if chunk.lower is not None:
            parts.append(f"{column} >= {int(chunk.lower)}")
        if chunk.upper is not None:
            parts.append(f"{column} < {int(chunk.upper)}")
        return " AND ".join(parts) or "true"
    parts = []
    if chunk.lower is not None:
        parts.append(f"ctid >= '({int(chunk.lower)},0)'::tid")
    if chunk.upper is not None:
        parts.append(f"ctid < '({int(chunk.upper)},0)'::tid")
    return " AND ".join(parts) or "true"
