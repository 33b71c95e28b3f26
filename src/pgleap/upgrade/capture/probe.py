"""The probe pgleap runs inside a captured transaction: its txid, its now() and the settings in effect."""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from functools import lru_cache

from pgleap.protocol import codes
from pgleap.protocol.messages import cstr, message, text_row
from pgleap.upgrade.capture.classify import StatementInfo
from pgleap.upgrade.compat import Facts

# Settings that change what a replayed statement means; captured with each transaction.
CAPTURED_SETTINGS = ("search_path", "TimeZone", "DateStyle", "IntervalStyle", "standard_conforming_strings")
_CAPTURED_NAMES = frozenset(name.lower() for name in CAPTURED_SETTINGS)
_TEXT_OID = 25

# now() as ISO 8601 in UTC with microseconds, so that pinning it into a replayed statement does not
# depend on the session's DateStyle or TimeZone.
SOURCE_NOW_SQL = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00'"

PROBE_NAME = "pgleap_probe"  # statement and portal name used in the extended protocol


@lru_cache(maxsize=8)
def probe_sql(facts: Facts) -> str:
    """The probe's text for a source of this version: txid (NULL if nothing written), now(), settings."""
    settings = ", ".join(f"current_setting('{name}')" for name in CAPTURED_SETTINGS)
    return f"SELECT {facts.capture_txid_sql()}, {SOURCE_NOW_SQL}, {settings}"


def probe_query(sql: str) -> bytes:
    """The probe as a simple Query message."""
    return message(codes.QUERY, cstr(sql))


def probe_extended(sql: str) -> list[tuple[int, bytes]]:
    """The probe as extended-protocol messages (Close, Parse, Bind, Execute) on pgleap's own names.

    Closing first makes the Parse and Bind safe whether or not an earlier probe of the same
    transaction left its portal or statement behind
    (or the client's DISCARD ALL removed it), and the named statement and portal never disturb
    the client's unnamed ones.
    """
    return [
        (codes.CLOSE, message(codes.CLOSE, b"P" + cstr(PROBE_NAME))),
        (codes.CLOSE, message(codes.CLOSE, b"S" + cstr(PROBE_NAME))),
        (codes.PARSE, message(codes.PARSE, cstr(PROBE_NAME) + cstr(sql) + struct.pack("!h", 0))),
        (codes.BIND, message(codes.BIND, cstr(PROBE_NAME) + cstr(PROBE_NAME) + struct.pack("!hhh", 0, 0, 0))),
        (codes.EXECUTE, message(codes.EXECUTE, cstr(PROBE_NAME) + struct.pack("!i", 0))),
    ]


def parse_probe_row(body: bytes) -> tuple[int | None, str, tuple[tuple[str, str], ...]]:
    """txid (None when the transaction has written nothing), now() and settings from the probe's DataRow."""
    txid, now, *settings = text_row(body)
    return (
        int(txid) if txid is not None else None,
        now or "",
        tuple((name, value or "") for name, value in zip(CAPTURED_SETTINGS, settings, strict=True)),
    )


def changes_captured_setting(info: StatementInfo) -> bool:
    """A SET or RESET, LOCAL or not, of a captured setting (RESET ALL included: its name is empty)."""
    setting = info.setting
    return setting is not None and (not setting[0] or setting[0].lower() in _CAPTURED_NAMES)


def settings_statement(
    settings: Sequence[tuple[str, str]], *, local: bool = True
) -> tuple[str, tuple[bytes, ...], tuple[int, ...]]:
    """One SELECT of set_config() for each (name, value), for the transaction (`local`) or the session; values
    as text parameters: its text, parameters and their types."""
    flag = "true" if local else "false"
    calls = ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, {flag})" for i in range(len(settings)))
    params = tuple(part.encode() for pair in settings for part in pair)
    return f"SELECT {calls}", params, (_TEXT_OID,) * len(params)


_SETTINGS_STATEMENT = re.compile(r"SELECT set_config\(\$1, \$2, true\)(?:, set_config\(\$\d+, \$\d+, true\))*")


def is_settings_statement(sql: str) -> bool:
    """Whether `sql` is a settings_statement() for the transaction (what capture keeps for a SET between writes)."""
    return _SETTINGS_STATEMENT.fullmatch(sql) is not None
