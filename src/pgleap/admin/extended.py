"""The admin console's extended protocol: Parse, Bind, Describe, Execute, Close for commands without
parameters, so drivers that prepare (psycopg after `prepare_threshold` runs, asyncpg's fetch, JDBC) can
poll the console as they poll PostgreSQL.

A command runs once per execution. Describing a portal runs it (its columns are known only then) and the
portal's Execute sends that result. Describing a statement runs it only for a SHOW (no effects); any
other command is refused there, with a hint, rather than run by a Describe that may never be executed.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pgleap.admin.commands import Result
from pgleap.protocol import codes
from pgleap.protocol.messages import ProtocolError, data_row, message, row_description, split_cstr

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
PARSE_COMPLETE = message(ord("1"))
BIND_COMPLETE = message(ord("2"))
CLOSE_COMPLETE = message(ord("3"))
NO_DATA = message(codes.NO_DATA)
NO_PARAMETERS = message(ord("t"), _I16.pack(0))  # ParameterDescription: none

Runner = Callable[[str], Awaitable[Result]]


class ExtendedQueryError(Exception):
    """A message the console refuses; the console answers ErrorResponse and skips to Sync."""

    def __init__(self, text: str, sqlstate: str, hint: str | None = None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.hint = hint


@dataclass
class _Portal:
    text: str
    formats: list[int]  # the result formats Bind asked for (every column is text: the bytes are the same)
    result: Result | None = None  # run by Describe, waiting for Execute
    rows_sent: int = 0  # rows of `result` already sent (Execute with a row limit)


@dataclass
class ExtendedQueries:
    """One admin session's prepared statements and portals."""

    run: Runner
    statements: dict[str, str] = field(default_factory=dict)
    portals: dict[str, _Portal] = field(default_factory=dict)

    def parse(self, body: bytes) -> bytes:
        """Parse: remember the statement's text."""
        name, offset = split_cstr(body)
        text, offset = split_cstr(body, offset)
        commands = [s for s in text.split(";") if s.strip()]
        if len(commands) > 1:
            raise ExtendedQueryError("cannot insert multiple commands into a prepared statement", codes.SYNTAX_ERROR)
        if name and name in self.statements:
            raise ExtendedQueryError(f'prepared statement "{name}" already exists', "42P05")
        self.statements[name] = commands[0].strip() if commands else ""
        return PARSE_COMPLETE

    def bind(self, body: bytes) -> bytes:
        """Bind: a portal for a statement; admin commands take no parameters."""
        portal, offset = split_cstr(body)
        statement, offset = split_cstr(body, offset)
        text = self._statement(statement)
        _, offset = _int16s(body, offset)  # parameter formats: there are no parameters to read
        (count,) = _I16.unpack_from(body, offset)
        if count:
            raise ExtendedQueryError(
                f"admin commands take no parameters, got {count}",
                codes.FEATURE_NOT_SUPPORTED,
                hint="write the argument into the command's text, e.g. VERIFY TABLE 'public.accounts'",
            )
        formats, _ = _int16s(body, offset + 2)
        if any(f not in (0, 1) for f in formats):
            raise ProtocolError(f"result format codes must be 0 or 1, got {formats}")
        if portal and portal in self.portals:
            raise ExtendedQueryError(f'cursor "{portal}" already exists', "42P03")
        self.portals[portal] = _Portal(text, formats)
        return BIND_COMPLETE

    async def describe(self, body: bytes) -> bytes:
        """Describe a statement (its parameters, then its columns) or a portal (its columns)."""
        kind, name = body[:1], split_cstr(body, 1)[0]
        if kind == b"S":
            text = self._statement(name)
            if not text.upper().startswith("SHOW"):
                raise ExtendedQueryError(
                    f"only SHOW commands can be described as a statement; {text!r} has effects, so it runs only "
                    f"when executed",
                    codes.FEATURE_NOT_SUPPORTED,
                    hint="send it as a simple query (asyncpg: Connection.execute) or Bind and Describe the portal",
                )
            return NO_PARAMETERS + _describe(await self.run(text) if text else None)
        if kind != b"P":
            raise ProtocolError(f"Describe of {kind!r}: expected 'S' or 'P'")
        portal = self._portal(name)
        if portal.result is None and portal.text:
            portal.result = await self.run(portal.text)
        return _describe(portal.result, portal.formats)

    async def execute(self, body: bytes) -> bytes:
        """Execute a portal: its rows (up to the limit, then PortalSuspended) and CommandComplete."""
        name, offset = split_cstr(body)
        (limit,) = _I32.unpack_from(body, offset)
        portal = self._portal(name)
        if not portal.text:
            return message(ord("I"))  # EmptyQueryResponse
        if portal.result is None:
            portal.result = await self.run(portal.text)
        result = portal.result
        start = portal.rows_sent
        end = len(result.rows) if limit <= 0 else min(len(result.rows), start + limit)
        out = b"".join(data_row(row) for row in result.rows[start:end])
        if limit > 0 and end < len(result.rows):
            portal.rows_sent = end
            return out + message(codes.PORTAL_SUSPENDED)
        # A portal runs its command once; executing it again answers nothing more, as in PostgreSQL.
        portal.result, portal.rows_sent = Result(result.tag), 0
        return out + message(codes.COMMAND_COMPLETE, result.tag.encode() + b"\0")

    def close(self, body: bytes) -> bytes:
        """Close a statement or a portal (closing one that does not exist is not an error)."""
        kind, name = body[:1], split_cstr(body, 1)[0]
        (self.statements if kind == b"S" else self.portals).pop(name, None)
        return CLOSE_COMPLETE

    def sync(self) -> None:
        """Sync ends the implicit transaction: the unnamed portal goes with it."""
        self.portals.pop("", None)

    def _statement(self, name: str) -> str:
        try:
            return self.statements[name]
        except KeyError:
            raise ExtendedQueryError(f'prepared statement "{name}" does not exist', "26000") from None

    def _portal(self, name: str) -> _Portal:
        try:
            return self.portals[name]
        except KeyError:
            raise ExtendedQueryError(f'portal "{name}" does not exist', "34000") from None


def _describe(result: Result | None, formats: list[int] | None = None) -> bytes:
    if result is None or not result.columns:
        return NO_DATA
    return row_description(result.columns, formats or ())


def _int16s(body: bytes, offset: int) -> tuple[list[int], int]:
    """A count-prefixed int16 array and the offset after it."""
    (count,) = _I16.unpack_from(body, offset)
    values = list(struct.unpack_from(f"!{count}h", body, offset + 2))
    return values, offset + 2 + 2 * count
