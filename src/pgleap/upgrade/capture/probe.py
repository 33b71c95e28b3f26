"""The probe pgleap runs inside a captured transaction: its txid, its now() and the settings in effect."""

from __future__ import annotations

import struct

from pgleap.protocol import codes
from pgleap.protocol.messages import cstr, message

# Settings that change what a replayed statement means; captured with each transaction.
CAPTURED_SETTINGS = ("search_path", "TimeZone", "DateStyle", "IntervalStyle", "standard_conforming_strings")

# now() as ISO 8601 in UTC with microseconds, so that pinning it into a replayed statement does not
# depend on the session's DateStyle or TimeZone.
SOURCE_NOW_SQL = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00'"

PROBE_SQL = f"SELECT txid_current()::text, {SOURCE_NOW_SQL}, " + ", ".join(
    f"current_setting('{name}')" for name in CAPTURED_SETTINGS
)
PROBE_NAME = "pgleap_probe"  # statement and portal name used in the extended protocol


def probe_query() -> bytes:
    """The probe as a simple Query message."""
    return message(codes.QUERY, cstr(PROBE_SQL))


def probe_extended() -> list[tuple[int, bytes]]:
    """The probe as extended-protocol messages (Close, Parse, Bind, Execute) on pgleap's own names.

    Closing first makes the Parse safe whether or not an earlier probe left the statement behind,
    and the named statement and portal never disturb the client's unnamed ones.
    """
    return [
        (codes.CLOSE, message(codes.CLOSE, b"S" + cstr(PROBE_NAME))),
        (codes.PARSE, message(codes.PARSE, cstr(PROBE_NAME) + cstr(PROBE_SQL) + struct.pack("!h", 0))),
        (codes.BIND, message(codes.BIND, cstr(PROBE_NAME) + cstr(PROBE_NAME) + struct.pack("!hhh", 0, 0, 0))),
        (codes.EXECUTE, message(codes.EXECUTE, cstr(PROBE_NAME) + struct.pack("!i", 0))),
    ]


def parse_probe_row(body: bytes) -> tuple[int, str, tuple[tuple[str, str], ...]]:
    """txid, now() and settings from the probe's DataRow (text format)."""
    values: list[str] = []
    (count,) = struct.unpack_from("!h", body)
    offset = 2
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, offset)
        offset += 4
        values.append(body[offset : offset + length].decode())
        offset += length
    txid, now, *settings = values
    return int(txid), now, tuple(zip(CAPTURED_SETTINGS, settings, strict=True))
