"""When the copy splits a table into ranges: the LPT makespan rule, and plan_chunks applying it (no servers)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from pgleap.store import ChunkRecord
from pgleap.upgrade.compat import facts_for
from pgleap.upgrade.copy.model import Column, CopyOptions, Table
from pgleap.upgrade.copy.plan import (
    BLOCK_SIZE,
    RANGE_OVERHEAD,
    SPLIT_GAIN,
    choose_splits,
    chunk_costs,
    lpt_makespan,
    plan_chunks,
)

MB = 1_000_000


# -- lpt_makespan --------------------------------------------------------------------------


def test_lpt_one_worker_is_the_sum() -> None:
    assert lpt_makespan([5, 1, 3], 1) == 9


def test_lpt_more_workers_than_chunks_is_the_largest() -> None:
    assert lpt_makespan([5, 1, 3], 8) == 5


def test_lpt_places_longest_first_on_the_least_loaded() -> None:
    # 7|6 after the two largest, then 4 joins the 6, 3 the 7: 10|10.
    assert lpt_makespan([3, 6, 4, 7], 2) == 10


def test_lpt_is_the_greedy_schedule_not_the_optimum() -> None:
    # The textbook case: LPT gives 3+2+2 = 7 where 3+3 | 2+2+2 = 6 is possible.
    assert lpt_makespan([3, 3, 2, 2, 2], 2) == 7


def test_lpt_of_nothing_is_zero_and_workers_must_be_positive() -> None:
    assert lpt_makespan([], 3) == 0
    with pytest.raises(ValueError):
        lpt_makespan([1], 0)


# -- chunk_costs ---------------------------------------------------------------------------


def test_chunk_costs_whole_table_costs_its_size() -> None:
    assert chunk_costs(100 * MB, 1) == [100 * MB]


def test_chunk_costs_ranges_pay_the_range_overhead() -> None:
    costs = chunk_costs(100 * MB, 4)
    assert len(costs) == 4
    assert sum(costs) == pytest.approx(100 * MB * (1 + RANGE_OVERHEAD))
    assert RANGE_OVERHEAD > 0


# -- choose_splits -------------------------------------------------------------------------


def test_a_table_dominating_the_copy_is_split() -> None:
    # 1 GB against 200 MB of small tables on 4 workers: copied whole it alone sets the wall time.
    assert choose_splits([1000 * MB, 100 * MB, 100 * MB], [8, 1, 1], 4) == [True, False, False]


def test_the_bench_case_stays_whole() -> None:
    # bench/copy_bench.py: pgbench_accounts (~410 MB, 4 ranges) and wide (~240 MB) on 2 workers.
    # Split, the ranges fill the second worker while wide runs: 384 vs 410, a 6% gain that does
    # not pay for the ranges' extra CPU (measured: whole was faster).
    sizes = [410 * MB, 241 * MB, 0.1 * MB]
    assert choose_splits(sizes, [4, 1, 1], 2) == [False, False, False]


def test_other_tables_filling_the_workers_keep_a_large_table_whole() -> None:
    sizes = [400 * MB, 390 * MB, 380 * MB, 370 * MB]
    assert choose_splits(sizes, [4, 4, 4, 4], 4) == [False] * 4
    assert choose_splits(sizes, [4, 4, 4, 4], 2) == [False] * 4


def test_one_worker_never_splits() -> None:
    # With one worker the makespan is the sum, and ranges only add to it.
    assert choose_splits([10_000 * MB, 1 * MB], [80, 1], 1) == [False, False]


def test_two_large_tables_are_split_together() -> None:
    # Splitting either one alone leaves the other as long as before; splitting both halves the time.
    assert choose_splits([1000 * MB, 1000 * MB], [8, 8], 4) == [True, True]


def test_only_the_splits_that_pay_are_made() -> None:
    # On 2 workers the 1 GB table must be split; then the 260 MB one fits beside its ranges, and
    # splitting it as well would only add work.
    sizes = [1000 * MB, 260 * MB, 10 * MB]
    assert choose_splits(sizes, [8, 3, 1], 2) == [True, False, False]


def test_a_gain_below_the_margin_is_not_taken() -> None:
    # 300 + 100 on 2 workers: whole 300; 3 ranges of 125 -> 250 + 125 = 250 | 225: a 16.7% gain.
    sizes, pieces = [300 * MB, 100 * MB], [3, 1]
    split = lpt_makespan([*chunk_costs(sizes[0], 3), sizes[1]], 2)
    gain = 1 - split / sizes[0]
    assert 0 < gain < 0.2
    assert choose_splits(sizes, pieces, 2, gain=gain - 0.01) == [True, False]
    assert choose_splits(sizes, pieces, 2, gain=gain + 0.01) == [False, False]
    assert 0 < SPLIT_GAIN < 1


def test_tables_that_are_no_candidates_are_never_split() -> None:
    assert choose_splits([1000 * MB, 1 * MB], [1, 1], 4) == [False, False]
    assert choose_splits([], [], 4) == []
    with pytest.raises(ValueError):
        choose_splits([1.0], [1, 2], 4)


def test_the_test_suites_small_tables_still_split() -> None:
    # tests/test_copy.py: `wide` is ~2 MB with 200 kB chunks among ~90 kB of small tables, 2 workers;
    # tests/test_copy_resume.py: `big` is ~22 MB in 0.2 MiB chunks. Both must still be cut into ranges.
    small = [24576, 16384, 16384, 8192, 8192, 8192, 8192, 0]
    assert choose_splits([2_048_000, *small], [11] + [1] * len(small), 2)[0]
    assert choose_splits([22_347_776, 8192], [107, 1], 2) == [True, False]


# -- CopyOptions ---------------------------------------------------------------------------


def test_split_policy_defaults_to_makespan_and_is_checked() -> None:
    assert CopyOptions().split_policy == "makespan"
    assert CopyOptions(split_policy="always").split_policy == "always"
    with pytest.raises(ValueError, match="split_policy"):
        CopyOptions(split_policy="sometimes")


# -- plan_chunks ---------------------------------------------------------------------------


class FakeConn:
    """What plan_chunks asks of a session: each table's file size, and its key's min and max."""

    def __init__(self, sizes: dict[int, int], bounds: dict[str, tuple[int, int]]) -> None:
        self.sizes = sizes
        self.bounds = bounds

    async def fetchval(self, query: str, oid: int) -> int:
        assert "pg_relation_size" in query
        return self.sizes[oid]

    async def fetchrow(self, query: str) -> tuple[int, int]:
        return next(b for name, b in self.bounds.items() if name in query)


def _table(name: str, oid: int, size: int, key: bool = True) -> Table:
    return Table(
        schema="public",
        name=name,
        oid=oid,
        persistence="p",
        pages=size // BLOCK_SIZE,
        reltuples=size / 100,
        is_partition=False,
        has_children=False,
        columns=(Column("id", "int4", "pg_catalog", None),),
        key=("id",) if key else (),
        key_types=("int4",) if key else (),
    )


def _plan(tables: list[Table], options: CopyOptions, version_num: int = 100000) -> list[ChunkRecord]:
    conn: Any = FakeConn({t.oid: t.pages * BLOCK_SIZE for t in tables}, {f'"{t.name}"': (1, 1_000_000) for t in tables})
    return asyncio.run(plan_chunks(conn, facts_for(version_num), tables, options))


def _kinds(chunks: list[ChunkRecord]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for chunk in chunks:
        kinds.setdefault(chunk.table_name, []).append(chunk.kind)
    return kinds


def test_plan_keeps_the_bench_tables_whole_by_default_and_splits_them_with_always() -> None:
    tables = [_table("accounts", 1, 410 * 1024 * 1024), _table("wide", 2, 300 * 1024 * 1024)]
    options = CopyOptions(parallel_workers=2)
    assert _kinds(_plan(tables, options)) == {"accounts": ["table"], "wide": ["table"]}
    always = _kinds(_plan(tables, CopyOptions(parallel_workers=2, split_policy="always")))
    assert always == {"accounts": ["key"] * 4, "wide": ["key"] * 3}


def test_plan_splits_a_dominant_table_into_key_ranges_covering_every_key() -> None:
    tables = [_table("big", 1, 1024 * 1024 * 1024), _table("small", 2, 8 * 1024 * 1024)]
    chunks = _plan(tables, CopyOptions(parallel_workers=4))
    big = [c for c in chunks if c.table_name == "big"]
    assert [c.kind for c in big] == ["key"] * 8
    assert big[0].lower is None and big[-1].upper is None  # open ends: no row falls outside
    assert all(a.upper == b.lower for a, b in itertools.pairwise(big))
    assert [c.kind for c in chunks if c.table_name == "small"] == ["table"]
    assert chunks == sorted(chunks, key=lambda c: -c.est_bytes)


def test_plan_weighs_only_tables_it_can_split() -> None:
    # No integer key on a pre-14 source: the table cannot be cut, and is no candidate.
    tables = [_table("nokey", 1, 1024 * 1024 * 1024, key=False), _table("small", 2, 8 * 1024 * 1024)]
    assert _kinds(_plan(tables, CopyOptions(parallel_workers=4))) == {"nokey": ["table"], "small": ["table"]}
    # On 14+ it is cut into ctid ranges.
    kinds = _kinds(_plan(tables, CopyOptions(parallel_workers=4), version_num=140000))
    assert kinds["nokey"] == ["ctid"] * 8
