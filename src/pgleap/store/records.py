"""Change-log records: captured statements and transactions, and their versioned msgpack encoding."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import msgpack

from pgleap.errors import PgleapError

# The first byte of every encoded record names its layout, so a newer pgleap can still read the records an
# older one wrote (a log may outlive an upgrade of pgleap itself). Add a new constant and decoder per layout;
# never change what an existing one means.
FORMAT_V1 = 1
FORMAT_V2 = 2  # V1's fields, then the transaction's checks (reads compared while it is replayed)
CURRENT_FORMAT = FORMAT_V2  # written only for a transaction with checks; V1 otherwise, as older pgleap reads it
IMAGE_FORMAT_V1 = 1  # the first byte of CapturedStatement.images


class RecordFormatError(PgleapError):
    """A change-log record cannot be decoded (unknown format byte, or damaged bytes)."""


class LogState(StrEnum):
    """Where a logged transaction stands: written before its COMMIT was forwarded, then settled."""

    PENDING = "pending"  # durable before COMMIT went to the source; outcome not known yet
    COMMITTED = "committed"  # the source answered COMMIT; replay applies it
    ABORTED = "aborted"  # ROLLBACK or an error; never replayed
    UNRESOLVED = "unresolved"  # outcome could not be determined after a crash (9.x); kept and reported


@dataclass(frozen=True)
class CapturedStatement:
    """One write statement as the client sent it, with what replay needs to send it again."""

    sql: str
    params: tuple[bytes | None, ...] = ()  # Bind parameter values as sent (None = SQL NULL)
    param_formats: tuple[int, ...] = ()  # Bind parameter format codes (0 text, 1 binary)
    param_types: tuple[int, ...] = ()  # Parse parameter type OIDs (0 = unspecified)
    copy_data: bytes | None = None  # the COPY FROM STDIN payload, concatenated CopyData
    tag: str = ""  # the source's command tag, e.g. "INSERT 0 1"
    images: bytes | None = None  # opaque row images (RETURNING rows), encoded by capture


@dataclass(frozen=True)
class CapturedCheck:
    """A read the source ran inside the transaction, with its result's digest: compared where it is replayed."""

    before: int  # how many of the transaction's statements ran before it (its place in the replay)
    sql: str
    extended: bool  # sent as Parse/Bind/Execute with the parameters below; False: a simple Query
    params: tuple[bytes | None, ...] = ()
    param_formats: tuple[int, ...] = ()
    param_types: tuple[int, ...] = ()
    settings: tuple[tuple[str, str], ...] = ()  # the client's print settings (TimeZone, DateStyle, IntervalStyle)
    columns: tuple[tuple[str, int], ...] = ()  # the source result's digest: columns (name, type OID),
    rows: int = 0  # row count,
    multiset: int = 0  # order-insensitive row hash (64 bits),
    sequence: str | None = None  # and the ORDER BY keys' sequence hash (None: order not checked)
    source_seconds: float = 0.0  # the source's latency, as the proxy saw it
    low_log_id: int = 0  # every record at or below it had settled before the read was forwarded
    seen_at: float = 0.0  # epoch seconds


@dataclass(frozen=True)
class CapturedTransaction:
    """A transaction that wrote on the source, with the context that fixes what its statements mean."""

    database: str
    txid: int | None  # the source's txid_current(), from the probe
    source_now: str | None  # the source's now() text, pinned into statement replay
    settings: tuple[tuple[str, str], ...]  # session settings in effect (search_path, TimeZone, ...)
    statements: tuple[CapturedStatement, ...]
    session_id: int
    captured_at: float = field(default=0.0)
    checks: tuple[CapturedCheck, ...] = ()  # sampled reads inside it, by their place among the statements


@dataclass(frozen=True)
class LoggedTransaction:
    """A transaction as the log holds it: its commit-order position, its state and its content."""

    log_id: int
    position: int | None  # commit order within its database; None unless committed
    state: LogState
    transaction: CapturedTransaction


def encode_transaction(tx: CapturedTransaction) -> bytes:
    """The record's bytes: a format byte, then a msgpack array (positional, so small)."""
    body = [
        tx.database,
        tx.txid,
        tx.source_now,
        [list(pair) for pair in tx.settings],
        [_statement_fields(s) for s in tx.statements],
        tx.session_id,
        tx.captured_at,
    ]
    if not tx.checks:
        # Most records have no check: they stay in V1, which a pgleap from before checks can still read.
        v1: bytes = msgpack.packb(body, use_bin_type=True)
        return bytes([FORMAT_V1]) + v1
    body.append([_check_fields(c) for c in tx.checks])
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return bytes([FORMAT_V2]) + packed


def decode_transaction(data: bytes) -> CapturedTransaction:
    """Decode a record written by `encode_transaction` of this or an older pgleap."""
    if not data:
        raise RecordFormatError("empty change-log record; the log file is damaged")
    if data[0] not in (FORMAT_V1, FORMAT_V2):
        raise RecordFormatError(
            f"change-log record in format {data[0]}, which this pgleap cannot read; "
            f"run the pgleap version that wrote the log (or a newer one)"
        )
    try:
        body = msgpack.unpackb(data[1:], raw=False, use_list=True, strict_map_key=True)
        if data[0] == FORMAT_V1:
            return _decode_v1(body)
        *v1, checks = body
        return replace(_decode_v1(v1), checks=tuple(_decode_check_v2(c) for c in checks))
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise RecordFormatError(f"damaged change-log record (format {data[0]}): {exc}") from exc


def _statement_fields(s: CapturedStatement) -> list[Any]:
    return [s.sql, list(s.params), list(s.param_formats), list(s.param_types), s.copy_data, s.tag, s.images]


def _check_fields(c: CapturedCheck) -> list[Any]:
    return [
        c.before,
        c.sql,
        c.extended,
        list(c.params),
        list(c.param_formats),
        list(c.param_types),
        [list(pair) for pair in c.settings],
        [list(col) for col in c.columns],
        c.rows,
        c.multiset,
        c.sequence,
        c.source_seconds,
        c.low_log_id,
        c.seen_at,
    ]


def _decode_check_v2(fields: list[Any]) -> CapturedCheck:
    before, sql, extended, params, formats, types, settings, columns, rows, multiset, sequence, *rest = fields
    source_seconds, low_log_id, seen_at = rest
    return CapturedCheck(
        before=int(before),
        sql=str(sql),
        extended=bool(extended),
        params=tuple(_optional_bytes(p) for p in params),
        param_formats=tuple(int(f) for f in formats),
        param_types=tuple(int(t) for t in types),
        settings=tuple((str(k), str(v)) for k, v in settings),
        columns=tuple((str(name), int(oid)) for name, oid in columns),
        rows=int(rows),
        multiset=int(multiset),
        sequence=None if sequence is None else str(sequence),
        source_seconds=float(source_seconds),
        low_log_id=int(low_log_id),
        seen_at=float(seen_at),
    )


def _decode_v1(body: list[Any]) -> CapturedTransaction:
    database, txid, source_now, settings, statements, session_id, captured_at = body
    return CapturedTransaction(
        database=str(database),
        txid=None if txid is None else int(txid),
        source_now=None if source_now is None else str(source_now),
        settings=tuple((str(k), str(v)) for k, v in settings),
        statements=tuple(_decode_statement_v1(s) for s in statements),
        session_id=int(session_id),
        captured_at=float(captured_at),
    )


def _decode_statement_v1(fields: list[Any]) -> CapturedStatement:
    sql, params, formats, types, copy_data, tag, images = fields
    return CapturedStatement(
        sql=str(sql),
        params=tuple(_optional_bytes(p) for p in params),
        param_formats=tuple(int(f) for f in formats),
        param_types=tuple(int(t) for t in types),
        copy_data=_optional_bytes(copy_data),
        tag=str(tag),
        images=_optional_bytes(images),
    )


def _optional_bytes(value: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    raise TypeError(f"expected bytes or nil, found {type(value).__name__}")


@dataclass(frozen=True)
class RowImage:
    """The rows one INSERT wrote on the source (its RETURNING rows), replayed instead of the statement."""

    schema: str
    table: str
    columns: tuple[str, ...]
    upsert_key: tuple[str, ...]  # the primary key when the source ran ON CONFLICT DO UPDATE, else ()
    identity_always: bool  # the target needs OVERRIDING SYSTEM VALUE
    rows: tuple[tuple[str | None, ...], ...]  # values in text, as the target's input functions read them


def encode_image(image: RowImage) -> bytes:
    """CapturedStatement.images for `image`: a format byte, then a msgpack array."""
    body = [image.schema, image.table, list(image.columns), list(image.upsert_key), image.identity_always]
    packed: bytes = msgpack.packb([*body, [list(r) for r in image.rows]], use_bin_type=True)
    return bytes([IMAGE_FORMAT_V1]) + packed


def decode_image(data: bytes) -> RowImage:
    """Read back what `encode_image` wrote."""
    if not data or data[0] != IMAGE_FORMAT_V1:
        raise RecordFormatError(f"row image in format {data[:1]!r}, which this pgleap cannot read")
    try:
        schema, table, columns, key, identity, rows = msgpack.unpackb(data[1:], raw=False)
        return RowImage(
            str(schema),
            str(table),
            tuple(map(str, columns)),
            tuple(map(str, key)),
            bool(identity),
            tuple(tuple(None if v is None else str(v) for v in row) for row in rows),
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RecordFormatError(f"damaged row image: {exc}") from exc
