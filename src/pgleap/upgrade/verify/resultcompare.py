"""Digests of query results, normalised by type so that harmless cross-version changes compare equal.

A digest holds the columns (name, type OID), the row count, an order-insensitive hash of the rows (the
sum of one hash per row, modulo 2^64: a multiset hash, so rows without ORDER BY may come in any order)
and, for an ordered query, a hash of the sequence of its ORDER BY key values (ties may come in any order,
the keys may not). The source's digest is built as its rows stream to the client; the target's from the
rows pgleap reads itself, each value normalised by the *source* column's type, so that an allowed type
change (EXTRACT: float8 -> numeric) compares by value.

Version facts used here (PostgreSQL release notes):
- PG 12: float4/float8 text output is the shortest exact form (`extra_float_digits` >= 1 by default);
  before, 6/15 significant digits. Floats are compared by value at the precision the source printed.
- PG 14: EXTRACT returns numeric instead of double precision, and its column is named "extract"
  instead of "date_part".
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pgleap.protocol.codes import FIRST_USER_OID
from pgleap.protocol.messages import data_row_values

FLOAT4, FLOAT8, NUMERIC = 700, 701, 1700
FLOAT4_ARRAY, FLOAT8_ARRAY = 1021, 1022
_MASK = (1 << 64) - 1
_NUMBER = re.compile(r"-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|Infinity|NaN)")

# (source name, source type) -> (target name, target type) that is the same column after an upgrade.
ALLOWED_COLUMN_CHANGES: dict[tuple[str, int], tuple[str, int]] = {
    ("date_part", FLOAT8): ("extract", NUMERIC),  # PG 14: EXTRACT returns numeric, column named "extract"
}
ALLOWED_TYPE_CHANGES = frozenset([(FLOAT8, NUMERIC)])  # PG 14: EXTRACT(...) AS name


@dataclass(frozen=True)
class Column:
    """One result column as RowDescription gives it."""

    name: str
    type_oid: int


def parse_row_description(body: bytes) -> list[Column]:
    """The columns of a RowDescription message body."""
    (count,) = struct.unpack_from("!h", body, 0)
    offset = 2
    columns = []
    for _ in range(count):
        end = body.index(b"\0", offset)
        name = body[offset:end].decode("utf-8", "replace")
        offset = end + 1
        _table, _attnum, type_oid, _size, _mod, _fmt = struct.unpack_from("!IhIhih", body, offset)
        offset += 18
        columns.append(Column(name, type_oid))
    return columns


def _float_text(digits: int) -> Callable[[str], str]:
    def normalise(text: str) -> str:
        try:
            return format(float(text), f".{digits}g")
        except ValueError:
            return text

    return normalise


def _float_array(digits: int) -> Callable[[str], str]:
    one = _float_text(digits)

    def normalise(text: str) -> str:
        return _NUMBER.sub(lambda m: one(m.group(0)), text)

    return normalise


def _identity(text: str) -> str:
    return text


# By value at the precision PG < 12 prints by default: both sides then agree whatever extra_float_digits.
_NORMALISERS: dict[int, Callable[[str], str]] = {
    FLOAT4: _float_text(6),
    FLOAT8: _float_text(15),
    FLOAT4_ARRAY: _float_array(6),
    FLOAT8_ARRAY: _float_array(15),
}


def normaliser(type_oid: int) -> Callable[[str], str]:
    """How values of a source column type are made comparable across majors."""
    return _NORMALISERS.get(type_oid, _identity)


def columns_compatible(source: Sequence[Column], target: Sequence[Column]) -> str | None:
    """None when the target's columns are the source's (allowing known changes); else what differs."""
    if len(source) != len(target):
        return f"{len(source)} columns on the source, {len(target)} on the target"
    for i, (s, t) in enumerate(zip(source, target, strict=True)):
        if s == t:
            continue
        if ALLOWED_COLUMN_CHANGES.get((s.name, s.type_oid)) == (t.name, t.type_oid):
            continue
        if s.name == t.name and (
            (s.type_oid, t.type_oid) in ALLOWED_TYPE_CHANGES
            or (s.type_oid >= FIRST_USER_OID and t.type_oid >= FIRST_USER_OID)
        ):
            continue
        return f"column {i + 1}: {s.name} (type {s.type_oid}) on the source, {t.name} (type {t.type_oid}) on the target"
    return None


@dataclass(frozen=True)
class Digest:
    """What is compared of one result."""

    columns: tuple[Column, ...]
    rows: int
    multiset: int
    sequence: str | None  # hash of the ORDER BY keys in order; None when the order is not checked


class ResultHasher:
    """Builds a Digest row by row; values are normalised by the types of `reference` columns (or its own)."""

    def __init__(self, order_keys: tuple[str | int, ...] | None, reference: Sequence[Column] | None = None) -> None:
        self.order_keys = order_keys
        self.reference = list(reference) if reference is not None else None
        self.columns: list[Column] = []
        self.rows = 0
        self.multiset = 0
        self._key_index: list[int] | None = None
        self._sequence = hashlib.blake2b(digest_size=16) if order_keys is not None else None
        self._normalisers: list[Callable[[str], str]] = []

    def describe(self, columns: list[Column]) -> None:
        """The result's columns (RowDescription)."""
        self.columns = columns
        types = self.reference if self.reference is not None and len(self.reference) == len(columns) else columns
        self._normalisers = [normaliser(c.type_oid) for c in types]
        if self.order_keys is not None:
            names = [c.name for c in (types if types is self.reference else columns)]
            index: list[int] = []
            for key in self.order_keys:
                if isinstance(key, int) and 1 <= key <= len(columns):
                    index.append(key - 1)
                elif isinstance(key, str) and names.count(key) == 1:
                    index.append(names.index(key))
                else:
                    self._sequence = None  # ordered by something not in the output: the order is not checked
                    break
            self._key_index = index

    def row(self, values: Sequence[bytes | None]) -> None:
        """One row, values as text bytes (None for NULL)."""
        self.rows += 1
        cells = [
            b"\xff" if v is None else norm(v.decode("utf-8", "replace")).encode()
            for v, norm in zip(values, self._normalisers, strict=False)
        ]
        h = hashlib.blake2b(b"\0".join(c.replace(b"\0", b"\0\0") for c in cells), digest_size=8).digest()
        self.multiset = (self.multiset + int.from_bytes(h)) & _MASK
        if self._sequence is not None and self._key_index is not None:
            self._sequence.update(b"\1".join(cells[i] for i in self._key_index) + b"\2")

    def data_row(self, body: bytes) -> None:
        """One DataRow message body."""
        self.row(data_row_values(body)[0])

    def digest(self) -> Digest:
        """The digest of everything seen."""
        seq = self._sequence.hexdigest() if self._sequence is not None else None
        return Digest(tuple(self.columns), self.rows, self.multiset, seq)


def compare_digests(source: Digest, target: Digest, values: bool) -> str | None:
    """None when the results agree; else what differs (`values`: False compares columns and count only)."""
    differs = columns_compatible(source.columns, target.columns)
    if differs is not None:
        return differs
    if source.rows != target.rows:
        return f"{source.rows} rows on the source, {target.rows} on the target"
    if not values:
        return None
    if source.multiset != target.multiset:
        return f"the values of the {source.rows} rows differ"
    if source.sequence is not None and target.sequence is not None and source.sequence != target.sequence:
        return "the same rows, in a different ORDER BY order"
    return None
