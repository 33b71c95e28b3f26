"""Pure parts of verification: key ranges, the SQL text, batching and the row diff."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pgleap.upgrade.copy.model import Column, Table
from pgleap.upgrade.verify import checksums as sql
from pgleap.upgrade.verify.checksums import KeyRange
from pgleap.upgrade.verify.service import VerifyService
from pgleap.upgrade.verify.table import RowDifference, batches, row_differences

INT = Column("id", "int4", "pg_catalog", None)
TEXT_KEY = Table(
    "public", "t", 1, "p", 0, 0, False, False, (Column("k", "text", "pg_catalog", None),), ("k",), ("text",)
)
TWO_KEYS = Table(
    "s",
    "pair",
    2,
    "p",
    0,
    0,
    False,
    False,
    (Column("a", "int4", "pg_catalog", None), Column("b", "text", "pg_catalog", None)),
    ("a", "b"),
    ("int4", "text"),
)


def test_chunks_cover_the_span_without_gaps_or_overlaps() -> None:
    """(lower, b1], (b1, b2], ..., (bn, upper]; a bound equal to the span's end does not make an empty piece."""
    open_span = sql.chunks(KeyRange(None, None), [("10",), ("20",)])
    assert open_span == [KeyRange(None, ("10",)), KeyRange(("10",), ("20",)), KeyRange(("20",), None)]
    closed = sql.chunks(KeyRange(("5",), ("20",)), [("10",), ("20",)])
    assert closed == [KeyRange(("5",), ("10",)), KeyRange(("10",), ("20",))]
    assert sql.chunks(KeyRange(("5",), ("9",)), []) == [KeyRange(("5",), ("9",))]


def test_range_predicates_compare_keys_as_rows_cast_by_their_types() -> None:
    """Composite keys compare as ROW(...); values are quoted literals cast by schema-qualified type."""
    where = sql.range_predicate(TWO_KEYS, KeyRange(("1", "x'y"), None))
    assert where == """ROW("a", "b") > ROW('1'::"pg_catalog"."int4", 'x''y'::"pg_catalog"."text")"""
    assert sql.range_predicate(TWO_KEYS, KeyRange()) == "true"


def test_one_column_keys_are_matched_with_one_array_literal() -> None:
    """Quotes, backslashes and commas inside keys survive the array literal."""
    where = sql.keys_predicate(TEXT_KEY, [('a"b',), ("c\\d",), ("e'f,g",)])
    assert where == """"k" = ANY ('{"a\\"b","c\\\\d","e''f,g"}'::"pg_catalog"."text"[])"""
    pair = sql.keys_predicate(TWO_KEYS, [("1", "x")])
    assert pair == """ROW("a", "b") IN (ROW('1'::"pg_catalog"."int4", 'x'::"pg_catalog"."text"))"""


def test_floats_are_hashed_by_their_bits_and_other_columns_by_text() -> None:
    """float8send for floats and float arrays (their text changed in PG 12); ::text for the rest."""
    assert sql.column_expression(Column("f", "float8", "pg_catalog", None)).startswith("encode(float8send(")
    array = sql.column_expression(Column("fa", "_float4", "pg_catalog", "float4"))
    assert "unnest" in array and "array_dims" in array and "IS NULL THEN NULL" in array
    assert sql.column_expression(INT) == '"id"::text'


def test_chunk_sums_bucket_rows_by_piece() -> None:
    """One scan: a CASE gives each row its piece number, the last piece takes the rest."""
    pieces = sql.chunks(KeyRange(None, None), [("10",), ("20",)])
    query = sql.chunk_sums_sql(TEXT_KEY, pieces)
    assert 'WHEN ROW("k") <= ROW(\'10\'::"pg_catalog"."text") THEN 1' in query
    assert "THEN 2 ELSE 3 END" in query and "WHERE true GROUP BY 1" in query
    assert sql.parse_sums([("1", "3", "-12"), (2, 1, None)]) == {1: (3, -12), 2: (1, 0)}


def test_batches_respect_the_budget_and_never_drop_an_item() -> None:
    """Consecutive groups under the budget; an item heavier than the budget goes alone."""
    items = [5, 5, 5, 20, 1]
    assert list(batches(items, lambda x: x, 10)) == [[5, 5], [5], [20], [1]]
    assert list(batches([], lambda x: x, 10)) == []


def test_row_differences_name_each_kind() -> None:
    """Missing on the target, extra on it, or the same key with another hash."""
    source = {("1",): "a", ("2",): "b", ("3",): "c"}
    target = {("2",): "b", ("3",): "X", ("4",): "d"}
    assert row_differences(source, target) == [
        RowDifference(("1",), "missing_on_target"),
        RowDifference(("3",), "different"),
        RowDifference(("4",), "extra_on_target"),
    ]


def offline_service(
    monkeypatch: pytest.MonkeyPatch,
    tables: list[object],
    check: Callable[..., Awaitable[list[object]]],
    stands_for: Callable[..., Awaitable[list[object]]],
) -> VerifyService:
    """A VerifyService whose source, tables, checks and flag resolution are these stand-ins (no server)."""
    from types import SimpleNamespace

    from pgleap.upgrade.verify import flags as verify_flags
    from pgleap.upgrade.verify import service as verify_service

    service = verify_service.VerifyService(lambda _: None, lambda _: None)

    async def listed(*_args: object) -> list[object]:
        return tables

    async def nothing() -> None:
        return None

    async def connect(_upgrade: object) -> object:
        return SimpleNamespace(close=nothing)

    monkeypatch.setattr(service, "_prepared", lambda _database: (None, None))
    monkeypatch.setattr(service, "_source", connect)
    monkeypatch.setattr(service, "_tables", listed)
    monkeypatch.setattr(service, "_check", check)
    monkeypatch.setattr(verify_service, "stands_for", stands_for)
    monkeypatch.setattr(verify_flags, "stands_for", stands_for)
    return service


def test_a_table_flagged_again_and_again_is_verified_at_most_a_tenth_of_the_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Triggers or SKIP LOCKED flag a busy table at every batch, during each check too: it stays flagged, and
    each check scans it whole. A flag that is gone is forgotten: a new one is looked at on the next round."""
    from types import SimpleNamespace

    from pgleap.upgrade.replay import ApplyJournal
    from pgleap.upgrade.verify import service as verify_service

    journal = ApplyJournal()
    clock = [100.0]
    monkeypatch.setattr(verify_service.time, "monotonic", lambda: clock[0])
    runs: list[float] = []
    busy = [True]
    position = [0]

    def flag() -> None:
        position[0] += 1
        journal.mark_resync("app", ("public.jobs",), position[0], "triggers fired again")

    async def check(*_args: object) -> list[object]:
        runs.append(clock[0])
        clock[0] += 2.0  # a two-second scan
        if busy[0]:
            flag()  # a batch replayed meanwhile
        return [SimpleNamespace(clean=True)]

    async def jobs(*_args: object, **_kwargs: object) -> list[object]:
        return [SimpleNamespace(oid=1, label="public.jobs")]

    service = offline_service(monkeypatch, [], check, jobs)
    for _ in range(39):
        flag()
        asyncio.run(service.resync_flagged("app", journal))
        clock[0] += 1.0
    # Each scan of 2 s is followed by 18 s of rest: 90% of the time neither server scans it.
    assert runs[:3] == [100.0, 120.0, 140.0] and journal.resync_flags("app")
    busy[0] = False
    clock[0] = runs[-1] + 20.0
    asyncio.run(service.resync_flagged("app", journal))  # quiet now: checked clean, and gone
    assert journal.resync_flags("app") == {}
    flag()
    asyncio.run(service.resync_flagged("app", journal))  # a new flag: looked at at once
    assert runs[-1] == clock[0] - 2.0 and journal.resync_flags("app") == {}


def test_a_table_is_named_by_schema_and_name_or_by_a_name_only_one_table_has() -> None:
    """VERIFY TABLE and FORCE RESYNC TABLE name one table: `orders` of one schema per tenant is ambiguous."""
    from pgleap.upgrade.copy.model import Table
    from pgleap.upgrade.verify.service import VerifyError, _named

    tables = [Table(schema, "orders", oid, "p", 1, 1.0, False, False) for oid, schema in enumerate(("t1", "t2"))]
    tables.append(Table("public", "items", 9, "p", 1, 1.0, False, False))
    assert [t.label for t in _named(tables, "app", ["items", "t2.orders"])] == ["public.items", "t2.orders"]
    with pytest.raises(VerifyError, match="2 tables"):
        _named(tables, "app", ["orders"])
    with pytest.raises(VerifyError, match="no table named 'gone'"):
        _named(tables, "app", ["gone"])


def test_a_flag_made_required_during_the_flagged_re_sync_is_not_cleared_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A view's flag stands for nothing to check until a skip makes it required: then for every table. A skip
    landing while the pass checks another table must not be cleared on the strength of the earlier answer."""
    from types import SimpleNamespace

    from pgleap.upgrade.replay import ApplyJournal

    journal = ApplyJournal()
    orders, items = SimpleNamespace(oid=1, label="public.orders"), SimpleNamespace(oid=2, label="public.items")

    async def stands_for(_source: object, tables: list[object], name: str, *, required: bool) -> list[object]:
        if name == "orders":
            return [orders]
        return tables if required else []  # "v", a view

    async def check(*_args: object) -> list[object]:
        journal.mark_resync("app", ("v",), 8, "txid 7 skipped", required=True)  # replay, meanwhile
        return [SimpleNamespace(clean=True)]

    service = offline_service(monkeypatch, [orders, items], check, stands_for)
    journal.mark_resync("app", ("orders",), 9, "triggers fired again")
    journal.mark_resync("app", ("v",), 10, "written through the view, computed again")
    asyncio.run(service.resync_flagged("app", journal))
    assert journal.required_resyncs("app") == ["v"]  # items was never checked
