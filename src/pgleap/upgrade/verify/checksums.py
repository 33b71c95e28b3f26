"""The SQL verification runs, the same text on source and target: row hashes, chunk sums, key ranges.

A row's hash is md5 of its columns' text in one ROW(...) (so NULL and '' differ), under pgleap's fixed
settings (replay/point.py WORK_SETTINGS: UTC, ISO dates, extra_float_digits 3, hex bytea). Floats are hashed
by their bits (float8send), because their text changed in PG 12 while their values did not; arrays of
floats element by element. A chunk's checksum is its row count and the sum of the first 64 bits of its
row hashes, which does not depend on the order rows are read in.

Key ranges are half-open from below: (lower, upper], with None for an open end; keys compare as rows, so
composite keys of any sortable type work. Key values travel as text and are cast back by their type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pgleap.upgrade.copy.connect import qualified, quote_ident, quote_literal
from pgleap.upgrade.copy.model import Column, Table

Key = tuple[str, ...]  # one row's key values, as text
_FLOATS = frozenset({"float4", "float8"})


@dataclass(frozen=True)
class KeyRange:
    """Rows whose key is above `lower` and at most `upper` (None: unbounded)."""

    lower: Key | None = None
    upper: Key | None = None

    def describe(self) -> str:
        """(lower, upper] for humans."""
        low = "-inf" if self.lower is None else ",".join(self.lower)
        high = "+inf" if self.upper is None else ",".join(self.upper)
        return f"({low}, {high}]"


def column_expression(column: Column) -> str:
    """The column as text that is equal on both majors exactly when the values are."""
    name = quote_ident(column.name)
    if column.type_name in _FLOATS:
        return f"encode(float8send({name}::float8), 'hex')"
    if column.element_name in _FLOATS:
        elements = f"ARRAY(SELECT encode(float8send(e::float8), 'hex') FROM unnest({name}) AS e)"
        return f"CASE WHEN {name} IS NULL THEN NULL ELSE coalesce(array_dims({name}), '') || {elements}::text END"
    return f"{name}::text"


def row_hash(table: Table) -> str:
    """md5 of the row's normalised columns."""
    return "md5(ROW(" + ", ".join(column_expression(c) for c in table.columns) + ")::text)"


def _hash_bits(table: Table) -> str:
    return f"('x' || substr({row_hash(table)}, 1, 16))::bit(64)::bigint"


def _key_column(table: Table, name: str) -> Column:
    for column in table.columns:
        if column.name == name:
            return column
    raise ValueError(f"{table.label}: key column {name!r} is not among its columns")


def _key_row(table: Table) -> str:
    return "ROW(" + ", ".join(quote_ident(k) for k in table.key) + ")"


def key_literal(table: Table, key: Key) -> str:
    """ROW('v1'::type1, ...) for a key given as text."""
    parts = []
    for name, value in zip(table.key, key, strict=True):
        column = _key_column(table, name)
        parts.append(f"{quote_literal(value)}::{qualified(column.type_schema, column.type_name)}")
    return "ROW(" + ", ".join(parts) + ")"


def range_predicate(table: Table, span: KeyRange) -> str:
    """The WHERE condition selecting the rows of `span`."""
    parts = []
    if span.lower is not None:
        parts.append(f"{_key_row(table)} > {key_literal(table, span.lower)}")
    if span.upper is not None:
        parts.append(f"{_key_row(table)} <= {key_literal(table, span.upper)}")
    return " AND ".join(parts) or "true"


def keys_predicate(table: Table, keys: Sequence[Key]) -> str:
    """The WHERE condition selecting the rows with these keys (an index lookup for a one-column key)."""
    if len(table.key) == 1:
        # One array literal: far cheaper to parse and plan than thousands of cast constants.
        column = _key_column(table, table.key[0])
        array = "{" + ",".join('"' + k[0].replace("\\", "\\\\").replace('"', '\\"') + '"' for k in keys) + "}"
        cast = qualified(column.type_schema, column.type_name)
        return f"{quote_ident(column.name)} = ANY ({quote_literal(array)}::{cast}[])"
    return f"{_key_row(table)} IN (" + ", ".join(key_literal(table, k) for k in keys) + ")"


def _order(table: Table) -> str:
    return ", ".join(quote_ident(k) for k in table.key)


def _key_text(table: Table) -> str:
    return ", ".join(f"{quote_ident(k)}::text" for k in table.key)


def boundaries_sql(table: Table, span: KeyRange, step: int, count: int) -> str:
    """Every `step`-th key of `span` in key order, at most `count` of them: the upper ends of chunks."""
    return (
        f"SELECT {_key_text(table)} FROM (SELECT {_order(table)}, row_number() OVER (ORDER BY {_order(table)}) AS rn "
        f"FROM (SELECT {_order(table)} FROM ONLY {table.qualified} WHERE {range_predicate(table, span)} "
        f"ORDER BY {_order(table)} LIMIT {step * count}) AS s) AS n WHERE rn % {step} = 0 ORDER BY rn"
    )


def chunks(span: KeyRange, bounds: Sequence[Key]) -> list[KeyRange]:
    """`span` cut at `bounds` (ascending, inside it); the last chunk keeps span's upper end."""
    edges: list[Key | None] = [span.lower, *bounds]
    if bounds and span.upper is not None and bounds[-1] == span.upper:
        edges.pop()
    pieces = [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    pieces.append(KeyRange(edges[-1], span.upper))
    return pieces


def chunk_sums_sql(table: Table, pieces: Sequence[KeyRange]) -> str:
    """(chunk number, row count, hash sum) of every non-empty chunk of consecutive `pieces`, in one scan."""
    whole = KeyRange(pieces[0].lower, pieces[-1].upper)
    if len(pieces) == 1:
        bucket = "1"
    else:
        cases = " ".join(
            f"WHEN {_key_row(table)} <= {key_literal(table, p.upper)} THEN {i}"
            for i, p in enumerate(pieces[:-1], start=1)
            if p.upper is not None
        )
        bucket = f"CASE {cases} ELSE {len(pieces)} END"
    return (
        f"SELECT {bucket} AS chunk, count(*)::text, sum({_hash_bits(table)})::text "
        f"FROM ONLY {table.qualified} WHERE {range_predicate(table, whole)} GROUP BY 1 ORDER BY 1"
    )


def table_sum_sql(table: Table) -> str:
    """Row count and hash sum of the whole table (a table without a key)."""
    return f"SELECT 1 AS chunk, count(*)::text, sum({_hash_bits(table)})::text FROM ONLY {table.qualified}"


def row_hashes_sql(table: Table, where: str) -> str:
    """Key (as text) and row hash of every row matching `where`."""
    return (
        f"SELECT {_key_text(table)}, {row_hash(table)} FROM ONLY {table.qualified} "
        f"WHERE {where} ORDER BY {_order(table)}"
    )


def rows_sql(table: Table, where: str) -> str:
    """Every column of the rows matching `where` (what COPY TO STDOUT sends for re-sync)."""
    columns = ", ".join(quote_ident(c.name) for c in table.columns)
    return f"SELECT {columns} FROM ONLY {table.qualified} WHERE {where}"


def copy_in_sql(table: Table) -> str:
    """COPY ... FROM STDIN of every column, in text."""
    columns = ", ".join(quote_ident(c.name) for c in table.columns)
    return f"COPY {table.qualified} ({columns}) FROM STDIN"


def parse_sums(rows: Sequence[Sequence[object]]) -> dict[int, tuple[int, int]]:
    """{chunk number: (rows, hash sum)} from chunk_sums_sql's answer (either side's)."""
    return {int(str(chunk)): (int(str(count)), int(str(total or 0))) for chunk, count, total in rows}
