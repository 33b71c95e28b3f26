"""Verifying one table: chunk checksums over key ranges at one source point per round, bisected to rows.

Chunk bounds come from the source (every `chunk_rows`-th key), read before the round's point: they only cut
the key space, so rows moving meanwhile land in some chunk on both sides. Each round compares up to
`chunks_per_round` chunks at one point (replay waits while the target side scans them). A chunk whose
count or hash sum differs is cut into SPLIT pieces by its source keys and compared again at a new point,
until a piece holds at most `row_rows` rows; those are compared row by row (key and row hash). Points are
exact (replay/point.py), so a difference is real at the point it was seen; a row the workload overwrites
on both sides between rounds may stop differing, and is then not reported. A table without a primary key
is compared whole (count and hash sum) and flagged: its differences cannot be narrowed to rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from pgleap.upgrade.copy.model import Table
from pgleap.upgrade.replay.applier import Replayer
from pgleap.upgrade.replay.wire import TargetSession
from pgleap.upgrade.verify import checksums as sql
from pgleap.upgrade.verify.aligned import at_same_point
from pgleap.upgrade.verify.checksums import Key, KeyRange

SPLIT = 16  # pieces a differing chunk is cut into
Difference = Literal["missing_on_target", "extra_on_target", "different"]


@dataclass(frozen=True)
class RowDifference:
    """One row that differs, by key (as text)."""

    key: Key
    kind: Difference


@dataclass
class TableVerification:
    """What verifying one table found."""

    database: str
    table: str
    keyed: bool
    started_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    source_rows: int = 0  # summed over the rounds (each at its own point)
    target_rows: int = 0
    chunks: int = 0
    differing_chunks: int = 0
    points: int = 0
    whole_table_differs: bool = False  # a table without a key whose count or hash sum differs
    differences: list[RowDifference] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing differs."""
        return not self.differences and not self.whole_table_differs

    def count(self, kind: Difference) -> int:
        """Rows of one kind of difference."""
        return sum(1 for d in self.differences if d.kind == kind)


class TableVerifier:
    """Compares one table of the source with the target, through the target's Replayer."""

    def __init__(
        self,
        replayer: Replayer,
        source: asyncpg.Connection,
        table: Table,
        *,
        chunk_rows: int = 10000,
        chunks_per_round: int = 10,
        row_rows: int | None = None,
    ) -> None:
        self.replayer = replayer
        self.source = source
        self.table = table
        self.chunk_rows = chunk_rows
        self.chunks_per_round = chunks_per_round
        self.row_rows = row_rows if row_rows is not None else max(1, math.ceil(chunk_rows / SPLIT))
        self.result = TableVerification(replayer.database, table.label, keyed=bool(table.key))

    async def run(self) -> TableVerification:
        """Verify the whole table."""
        started = time.monotonic()
        if not self.table.key:
            source, target = await self._sums_at_point(sql.table_sum_sql(self.table))
            self.result.chunks = 1
            self.result.source_rows, self.result.target_rows = source.get(1, (0, 0))[0], target.get(1, (0, 0))[0]
            if source != target:
                self.result.whole_table_differs = True
                self.result.differing_chunks = 1
        else:
            for piece, counts in await self._scan():
                await self._descend(piece, counts)
        self.result.seconds = time.monotonic() - started
        return self.result

    async def verify_keys(self, keys: Sequence[Key]) -> list[RowDifference]:
        """Row-level comparison of just these keys at one point (after a re-sync)."""
        return await self._rows_at_point(sql.row_hashes_sql(self.table, sql.keys_predicate(self.table, keys)))

    async def _scan(self) -> list[tuple[KeyRange, tuple[int, int]]]:
        """Every chunk in rounds; the differing ones with their (source, target) row counts."""
        differing: list[tuple[KeyRange, tuple[int, int]]] = []
        cursor: Key | None = None
        while True:
            bounds = await self._bounds(KeyRange(cursor, None), self.chunk_rows, self.chunks_per_round)
            last = len(bounds) < self.chunks_per_round
            span = KeyRange(cursor, None if last else bounds[-1])
            pieces = sql.chunks(span, bounds)
            differing += await self._compare(pieces, count_rows=True)
            if last:
                return differing
            cursor = bounds[-1]

    async def _descend(self, piece: KeyRange, counts: tuple[int, int]) -> None:
        if max(counts) <= self.row_rows:
            self.result.differences += await self._rows_at_point(
                sql.row_hashes_sql(self.table, sql.range_predicate(self.table, piece))
            )
            return
        step = max(1, math.ceil(counts[0] / SPLIT))
        pieces = sql.chunks(piece, await self._bounds(piece, step, SPLIT))
        if len(pieces) == 1:
            # The source has too few rows here to cut by (the target holds the surplus): compare rows.
            self.result.differences += await self._rows_at_point(
                sql.row_hashes_sql(self.table, sql.range_predicate(self.table, piece))
            )
            return
        for sub, sub_counts in await self._compare(pieces, count_rows=False):
            await self._descend(sub, sub_counts)

    async def _bounds(self, span: KeyRange, step: int, count: int) -> list[Key]:
        rows = await self.source.fetch(sql.boundaries_sql(self.table, span, step, count))
        return [tuple(str(v) for v in row.values()) for row in rows]

    async def _compare(self, pieces: list[KeyRange], *, count_rows: bool) -> list[tuple[KeyRange, tuple[int, int]]]:
        source, target = await self._sums_at_point(sql.chunk_sums_sql(self.table, pieces))
        if count_rows:
            self.result.chunks += len(pieces)
            self.result.source_rows += sum(c for c, _ in source.values())
            self.result.target_rows += sum(c for c, _ in target.values())
        differing = []
        for i, piece in enumerate(pieces, start=1):
            left, right = source.get(i, (0, 0)), target.get(i, (0, 0))
            if left != right:
                differing.append((piece, (left[0], right[0])))
        if count_rows:
            self.result.differing_chunks += len(differing)
        return differing

    async def _sums_at_point(self, query: str) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
        async def on_source(conn: asyncpg.Connection) -> dict[int, tuple[int, int]]:
            return sql.parse_sums([tuple(r.values()) for r in await conn.fetch(query)])

        async def on_target(session: TargetSession) -> dict[int, tuple[int, int]]:
            return sql.parse_sums(await session.query(query))

        self.result.points += 1
        source, target = await at_same_point(self.replayer, self.source, on_source, on_target)
        return source, target

    async def _rows_at_point(self, query: str) -> list[RowDifference]:
        async def on_source(conn: asyncpg.Connection) -> dict[Key, str]:
            return {tuple(str(v) for v in tuple(r.values())[:-1]): str(r[-1]) for r in await conn.fetch(query)}

        async def on_target(session: TargetSession) -> dict[Key, str]:
            return {tuple(str(v) for v in r[:-1]): str(r[-1]) for r in await session.query(query)}

        self.result.points += 1
        source, target = await at_same_point(self.replayer, self.source, on_source, on_target)
        return row_differences(source, target)


def row_differences(source: dict[Key, str], target: dict[Key, str]) -> list[RowDifference]:
    """Rows missing on the target, extra on it, or hashed differently; in key-text order."""
    found = [RowDifference(k, "missing_on_target") for k in source if k not in target]
    found += [RowDifference(k, "extra_on_target") for k in target if k not in source]
    found += [RowDifference(k, "different") for k, h in source.items() if k in target and target[k] != h]
    return sorted(found, key=lambda d: d.key)
