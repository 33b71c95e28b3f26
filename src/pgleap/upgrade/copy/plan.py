"""Read the source tables at S and cut them into chunks: whole tables, key ranges or ctid ranges."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence

import asyncpg

from pgleap.store import ChunkRecord
from pgleap.upgrade.compat import Facts, binary_safe
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.copy.connect import quote_ident
from pgleap.upgrade.copy.model import Column, CopyOptions, Table

BLOCK_SIZE = 8192
# A range chunk is read with COPY (SELECT ... WHERE range) instead of COPY table: an index (or ctid
# range) scan and the executor's projection for every row. On the 2-core bench, 4 key ranges of
# pgbench_accounts (scale 30) cost ~1.6 CPU-seconds more and made the copy slower than no split.
# An estimate, chosen with that measurement (see docs/copy.md, "When a table is split"): every byte
# of a range chunk costs this much more than a byte of a whole table. Fixed per-chunk costs (ms) are
# left out: under 1% of a default-sized range.
RANGE_OVERHEAD = 0.25
# Splitting must shorten the estimated makespan by more than this share, or tables stay whole: the
# estimate is rough, and a split costs CPU for sure while its gain is only predicted.
SPLIT_GAIN = 0.10

log = logging.getLogger(__name__)


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


def lpt_makespan(costs: Sequence[float], workers: int) -> float:
    """Finish time of the longest-first greedy schedule of `costs` on `workers` identical workers."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    loads = [0.0] * workers
    for cost in sorted(costs, reverse=True):
        heapq.heapreplace(loads, loads[0] + cost)
    return max(loads)


def chunk_costs(size: float, pieces: int) -> list[float]:
    """Estimated cost of each chunk of a table of `size` bytes copied whole (pieces <= 1) or in ranges."""
    if pieces <= 1:
        return [size]
    return [size / pieces * (1 + RANGE_OVERHEAD)] * pieces


def choose_splits(sizes: Sequence[float], pieces: Sequence[int], workers: int, gain: float = SPLIT_GAIN) -> list[bool]:
    """Which tables to split: the fewest largest candidates whose LPT makespan is within `gain` of the best."""
    if len(sizes) != len(pieces):
        raise ValueError("sizes and pieces must have the same length")
    # Splitting a table while a larger one stays whole seldom shortens anything, so the options
    # weighed are "split the k largest candidates (pieces > 1)", for k = 0 .. all of them.
    order = sorted((i for i, p in enumerate(pieces) if p > 1), key=lambda i: -sizes[i])
    costs = [chunk_costs(size, 1) for size in sizes]
    spans = [lpt_makespan([c for table in costs for c in table], workers)]
    total = float(sum(sizes))
    for i in order:
        costs[i] = chunk_costs(sizes[i], pieces[i])
        total += sum(costs[i]) - sizes[i]
        if total / workers >= min(spans):
            break  # every further split only adds work: no larger k can beat the best so far
        spans.append(lpt_makespan([c for table in costs for c in table], workers))
    best = min(spans)
    k = next(k for k, span in enumerate(spans) if span * (1 - gain) <= best)
    chosen = set(order[:k])
    return [i in chosen for i in range(len(sizes))]


def _can_split(table: Table, facts: Facts, size: int) -> bool:
    """Whether plan_chunks can cut this table into ranges at all (see there)."""
    if table.unlogged:
        return False
    return table.integer_key is not None or (facts.has_tid_range_scan and size > 0)


async def plan_chunks(
    conn: asyncpg.Connection, facts: Facts, tables: list[Table], options: CopyOptions
) -> list[ChunkRecord]:
    """Chunks for every table; sizes come from the files at S, key bounds from the rows at S."""
    sizes: list[int] = []
    estimates: list[float] = []
    wanted: list[int] = []
    for table in tables:
        size = int(await conn.fetchval("SELECT pg_relation_size($1::bigint::oid)", table.oid))
        # A standby's unlogged tables are empty files; the catalog's estimate is what we have.
        est_bytes = float(max(size, table.pages * BLOCK_SIZE))
        pieces = max(1, math.ceil(est_bytes / options.chunk_bytes)) if est_bytes > options.split_threshold_bytes else 1
        sizes.append(size)
        estimates.append(est_bytes)
        wanted.append(pieces if _can_split(table, facts, size) else 1)
    if options.split_policy == "always":
        splits = [p > 1 for p in wanted]
    else:
        splits = choose_splits(estimates, wanted, options.parallel_workers)
        if any(p > 1 for p in wanted):
            log.info(
                "split plan over %d workers: %s",
                options.parallel_workers,
                ", ".join(
                    f"{t.label} {e / 1e6:.0f} MB {'in ' + str(p) + ' ranges' if s else 'whole'}"
                    for t, e, p, s in zip(tables, estimates, wanted, splits, strict=True)
                    if p > 1
                ),
            )
    chunks: list[ChunkRecord] = []
    for table, size, est_bytes, pieces, split in zip(tables, sizes, estimates, wanted, splits, strict=True):
        if not split:
            pieces = 1
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
