"""Result comparison without servers: normalisation, digests, query shapes, sampling."""

from __future__ import annotations

import random
import struct

import pytest

from pgleap.protocol.messages import cstr
from pgleap.upgrade.verify.fingerprint import analyse, fingerprint
from pgleap.upgrade.verify.resultcompare import (
    FLOAT4,
    FLOAT8,
    FLOAT8_ARRAY,
    NUMERIC,
    Column,
    Digest,
    ResultHasher,
    columns_compatible,
    compare_digests,
    normaliser,
)
from pgleap.upgrade.verify.sampling import Sampler, result_formats

INT4, INT8, TEXT = 23, 20, 25


@pytest.mark.parametrize(
    ("oid", "pg10", "pg18"),
    [
        (FLOAT8, "0.3", "0.30000000000000004"),  # 0.1 + 0.2: 15 digits before PG 12, shortest exact after
        (FLOAT8, "0.333333333333333", "0.3333333333333333"),
        (FLOAT8, "1e-300", "1e-300"),
        (FLOAT8, "NaN", "NaN"),
        (FLOAT8, "-Infinity", "-Infinity"),
        (FLOAT4, "0.1", "0.1"),
        (FLOAT4, "0.333333", "0.33333334"),
        (FLOAT4, "1.17549e-38", "1.17549e-38"),
        (FLOAT8_ARRAY, "{0.3,-0.5}", "{0.30000000000000004,-0.5}"),
        (NUMERIC, "1.50", "1.50"),
    ],
)
def test_floats_compare_by_value(oid: int, pg10: str, pg18: str) -> None:
    norm = normaliser(oid)
    assert norm(pg10) == norm(pg18)


def test_floats_that_differ_still_differ() -> None:
    assert normaliser(FLOAT8)("0.3") != normaliser(FLOAT8)("0.31")
    assert normaliser(NUMERIC)("1.5") != normaliser(NUMERIC)("1.50")  # numeric is exact, scale included


def test_known_column_changes_are_allowed() -> None:
    assert columns_compatible([Column("date_part", FLOAT8)], [Column("extract", NUMERIC)]) is None
    assert columns_compatible([Column("e", FLOAT8)], [Column("e", NUMERIC)]) is None
    assert columns_compatible([Column("t", 16400)], [Column("t", 17001)]) is None  # a user type: other OIDs
    assert "column 1" in (columns_compatible([Column("n", INT4)], [Column("n", INT8)]) or "")
    assert "column 1" in (columns_compatible([Column("a", INT4)], [Column("b", INT4)]) or "")
    assert "2 columns" in (columns_compatible([Column("a", INT4)] * 2, [Column("a", INT4)]) or "")


def digest(
    rows: list[list[str | None]],
    columns: list[Column],
    keys: tuple[str | int, ...] | None = None,
    reference: list[Column] | None = None,
) -> Digest:
    hasher = ResultHasher(keys, reference)
    hasher.describe(columns)
    for row in rows:
        hasher.row([None if v is None else v.encode() for v in row])
    return hasher.digest()


def test_rows_without_order_by_may_come_in_any_order() -> None:
    cols = [Column("id", INT4), Column("x", FLOAT8)]
    a = digest([["1", "0.3"], ["2", None], ["3", "1"]], cols)
    b = digest([["3", "1"], ["1", "0.30000000000000004"], ["2", None]], cols)
    assert compare_digests(a, b, values=True) is None
    c = digest([["3", "1"], ["1", "0.3"], ["2", "0"]], cols)
    assert compare_digests(a, c, values=True) == "the values of the 3 rows differ"
    d = digest([["3", "1"], ["1", "0.3"]], cols)
    assert compare_digests(a, d, values=True) == "3 rows on the source, 2 on the target"
    assert compare_digests(a, c, values=False) is None  # shape only: columns and count


def test_order_by_keys_must_keep_their_order_ties_may_not() -> None:
    cols = [Column("k", INT4), Column("v", TEXT)]
    a = digest([["1", "a"], ["1", "b"], ["2", "c"]], cols, ("k",))
    b = digest([["1", "b"], ["1", "a"], ["2", "c"]], cols, ("k",))  # a tie in k, other order: fine
    assert compare_digests(a, b, values=True) is None
    c = digest([["2", "c"], ["1", "a"], ["1", "b"]], cols, ("k",))
    assert compare_digests(a, c, values=True) == "the same rows, in a different ORDER BY order"
    by_position = digest([["2", "c"], ["1", "a"], ["1", "b"]], cols, (1,))
    assert by_position.sequence == c.sequence


def test_target_values_are_normalised_by_the_source_column_type() -> None:
    """EXTRACT: float8 printed with 15 digits on PG 10, exact numeric on PG 18: equal by the source's type."""
    source_cols = [Column("date_part", FLOAT8)]
    a = digest([["1577836801.12346"]], source_cols)
    b = digest([["1577836801.123456"]], [Column("extract", NUMERIC)], reference=source_cols)
    assert compare_digests(a, b, values=True) is None


def test_query_shapes() -> None:
    assert fingerprint("SELECT * FROM t WHERE id = 1") == fingerprint("select * from t where id = 42")
    assert fingerprint("SELECT 5 !") == fingerprint("select 6 !")  # pglast cannot parse it: a text hash
    plain = analyse("SELECT a, b FROM s.t JOIN u USING (id)")
    assert plain.values_comparable and not plain.ordered and plain.relations == ("t", "u")
    ordered = analyse("SELECT a, b FROM t ORDER BY 2, a DESC")
    assert ordered.ordered and ordered.order_keys == (2, "a")
    assert analyse("SELECT a FROM t ORDER BY lower(a)").order_keys is None  # an expression: order not checked
    for sql in (
        "SELECT random()",
        "SELECT now()",
        "SELECT current_timestamp",
        "SELECT a FROM t LIMIT 3",
        "SELECT relname FROM pg_class",
        "SELECT * FROM information_schema.tables",
    ):
        assert not analyse(sql).values_comparable, sql
    assert analyse("SELECT a FROM t ORDER BY a LIMIT 3").values_comparable


def test_sampler_rates() -> None:
    assert not any(Sampler(0.0).take() for _ in range(1000))
    assert all(Sampler(1.0).take() for _ in range(1000))
    sampler = Sampler(0.1, random.Random(7))
    taken = sum(sampler.take() for _ in range(20000))
    assert 1700 < taken < 2300


def test_result_formats_of_a_bind() -> None:
    body = cstr("p") + cstr("s") + struct.pack("!hh", 1, 0) + struct.pack("!h", 2)
    body += struct.pack("!i", 3) + b"abc" + struct.pack("!i", -1) + struct.pack("!hhh", 2, 0, 1)
    assert result_formats(body) == (0, 1)
    assert result_formats(cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0)) == ()
