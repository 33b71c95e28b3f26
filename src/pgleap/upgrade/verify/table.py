"""Verifying one table: chunk checksums over key ranges at one source point per round, bisected to rows.

Chunk bounds come from the source (every `chunk_rows`-th key), read before the round's point: they only cut
the key space, so rows moving meanwhile land in some chunk on both sides. Each round compares up to
`chunks_per_round` chunks at one point (replay waits while the target side scans them). A chunk whose
count or hash sum differs is cut into SPLIT pieces by its source keys and compared again, until a piece
holds at most `row_rows` rows; those are compared row by row (key and row hash). Pieces of one level are
compared together, as many per point as one round's rows, so dense differences cost a few scans of the
table rather than a point per piece. Points are
exact (replay/point.py), so a difference is real at the point it was seen; a row the workload overwrites
on both sides between rounds may stop differing, and is then not reported. A table without a primary key
is compared whole (count and hash sum) and flagged: its differences cannot be narrowed to rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

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
            ((source, target),) = await self._sums_at_point([sql.table_sum_sql(self.table)])
            self.result.chunks = 1
            self.result.source_rows, self.result.target_rows = source.get(1, (0, 0))[0], target.get(1, (0, 0))[0]
            if source != target:
                self.result.whole_table_differs = True
                self.result.differing_chunks = 1
        else:
            await self._narrow(await self._scan())
        self.result.seconds = time.monotonic() - started
        return self.result

    async def verify_keys(self, keys: Sequence[Key]) -> list[RowDifference]:
        """Row-level comparison of just these keys at one point (after a re-sync)."""
        return await self._rows_at_point([sql.row_hashes_sql(self.table, sql.keys_predicate(self.table, keys))])

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

    async def _narrow(self, differing: list[tuple[KeyRange, tuple[int, int]]]) -> None:
        """Split differing pieces level by level; compare the small ones row by row."""
        budget = self.chunk_rows * self.chunks_per_round
        while differing:
            small = [(p, c) for p, c in differing if max(c) <= self.row_rows]
            groups: list[tuple[list[KeyRange], int]] = []  # a piece cut in pieces, and its rows
            for piece, counts in differing:
                if max(counts) <= self.row_rows:
                    continue
                pieces = sql.chunks(piece, await self._bounds(piece, max(1, math.ceil(counts[0] / SPLIT)), SPLIT))
                if len(pieces) == 1:
                    small.append((piece, counts))  # too few source rows to cut by: the target has the surplus
                else:
                    groups.append((pieces, max(counts)))
            for batch in batches(small, lambda item: max(item[1]), budget):
                queries = [sql.row_hashes_sql(self.table, sql.range_predicate(self.table, p)) for p, _ in batch]
                self.result.differences += await self._rows_at_point(queries)
            differing = []
            for group_batch in batches(groups, lambda item: item[1], budget):
                sums = await self._sums_at_point([sql.chunk_sums_sql(self.table, g) for g, _ in group_batch])
                for (group, _), (source, target) in zip(group_batch, sums, strict=True):
                    differing += _differing(group, source, target)

    async def _bounds(self, span: KeyRange, step: int, count: int) -> list[Key]:
        rows = await self.source.fetch(sql.boundaries_sql(self.table, span, step, count))
        return [tuple(str(v) for v in row.values()) for row in rows]

    async def _compare(self, pieces: list[KeyRange], *, count_rows: bool) -> list[tuple[KeyRange, tuple[int, int]]]:
        ((source, target),) = await self._sums_at_point([sql.chunk_sums_sql(self.table, pieces)])
        if count_rows:
            self.result.chunks += len(pieces)
            self.result.source_rows += sum(c for c, _ in source.values())
            self.result.target_rows += sum(c for c, _ in target.values())
        differing = _differing(pieces, source, target)
        if count_rows:
            self.result.differing_chunks += len(differing)
        return differing

    async def _sums_at_point(
        self, queries: list[str]
    ) -> list[tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]]:
        async def on_source(conn: asyncpg.Connection) -> list[dict[int, tuple[int, int]]]:
            return [sql.parse_sums([tuple(r.values()) for r in await conn.fetch(q)]) for q in queries]

        async def on_target(session: TargetSession) -> list[dict[int, tuple[int, int]]]:
            return [sql.parse_sums(await session.query(q)) for q in queries]

        self.result.points += 1
        source, target = await at_same_point(self.replayer, self.source, on_source, on_target)
        return list(zip(source, target, strict=True))

    async def _rows_at_point(self, queries: list[str]) -> list[RowDifference]:
        async def on_source(conn: asyncpg.Connection) -> dict[Key, str]:
            return {_key(r.values()): str(r[-1]) for q in queries for r in await conn.fetch(q)}

        async def on_target(session: TargetSession) -> dict[Key, str]:
            return {_key(r): str(r[-1]) for q in queries for r in await session.query(q)}

        self.result.points += 1
        source, target = await at_same_point(self.replayer, self.source, on_source, on_target)
        return row_differences(source, target)


def _key(row: Iterable[object]) -> Key:
    values = tuple(row)
    return tuple(str(v) for v in values[:-1])


def _differing(
    pieces: list[KeyRange], source: dict[int, tuple[int, int]], target: dict[int, tuple[int, int]]
) -> list[tuple[KeyRange, tuple[int, int]]]:
    """Pieces whose (count, hash sum) differ, with their (source, target) row counts."""
    found = []
    for i, piece in enumerate(pieces, start=1):
        left, right = source.get(i, (0, 0)), target.get(i, (0, 0))
        if left != right:
            found.append((piece, (left[0], right[0])))
    return found


T = TypeVar("T")


def batches(items: list[T], weight: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Consecutive groups of `items` whose weights add up to at most `budget` (at least one item each)."""
    batch: list[T] = []
    total = 0
    for item in items:
        if batch and total + weight(item) > budget:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += weight(item)
    if batch:
        yield batch


def row_differences(source: dict[Key, str], target: dict[Key, str]) -> list[RowDifference]:
    """Rows missing on the target, extra on it, or hashed differently; in key-text order."""
    found = [RowDifference(k, "missing_on_target") for k in source if k not in target]
    found += [RowDifference(k, "extra_on_target") for k in target if k not in source]
    found += [RowDifference(k, "different") for k, h in source.items() if k in target and target[k] != h]
    return sorted(found, key=lambda d: d.key)
