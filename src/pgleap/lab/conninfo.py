"""libpq keyword/value connection strings and postgresql.conf literals."""

from __future__ import annotations

import re

_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+-]+$")


def quote_conninfo_value(value: str) -> str:
    """Quote a libpq connection-string value when it is empty or has spaces, quotes or backslashes."""
    if _PLAIN.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def conninfo(**params: str | int | None) -> str:
    """Build "host=... port=..." from keyword arguments, skipping None values."""
    return " ".join(f"{key}={quote_conninfo_value(str(value))}" for key, value in params.items() if value is not None)


def conf_literal(value: str) -> str:
    """Quote a value for postgresql.conf / recovery.conf (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def sql_literal(value: str) -> str:
    """Quote a string as an SQL literal (standard_conforming_strings on, the default since 9.1)."""
    return "'" + value.replace("'", "''") + "'"
