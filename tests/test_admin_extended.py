"""The admin console's extended protocol, message by message (pure logic: a command runner stands in for
the proxy; tests/test_admin.py drives it with psycopg and asyncpg)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from pgleap.admin.commands import Result
from pgleap.admin.extended import ExtendedQueries, ExtendedQueryError
from pgleap.protocol.messages import cstr

ROWS = [[str(i)] for i in range(5)]


def queries() -> tuple[ExtendedQueries, list[str]]:
    ran: list[str] = []

    async def run(text: str) -> Result:
        ran.append(text)
        return Result("SHOW 5", ["n"], ROWS)

    return ExtendedQueries(run), ran


def bind(portal: str = "", statement: str = "", params: int = 0, formats: tuple[int, ...] = ()) -> bytes:
    body = cstr(portal) + cstr(statement) + struct.pack("!h", 0) + struct.pack("!h", params)
    body += b"".join(struct.pack("!i", 1) + b"x" for _ in range(params))
    return body + struct.pack(f"!h{len(formats)}h", len(formats), *formats)


def execute(portal: str, limit: int) -> bytes:
    return cstr(portal) + struct.pack("!i", limit)


def test_row_limited_execute_suspends_then_completes_and_runs_once() -> None:
    """Execute with a row limit sends that many rows and PortalSuspended, then the rest; the command ran once."""
    q, ran = queries()
    q.parse(cstr("s1") + cstr("SHOW STATS") + struct.pack("!h", 0))
    q.bind(bind("p1", "s1"))
    first = asyncio.run(q.execute(execute("p1", 2)))
    assert first.count(b"D\x00") == 2 and first.endswith(b"s\x00\x00\x00\x04"), first
    rest = asyncio.run(q.execute(execute("p1", 0)))
    assert rest.count(b"D\x00") == 3 and b"SHOW 5" in rest, rest
    assert ran == ["SHOW STATS"]


def test_describe_portal_runs_once_and_execute_sends_that_result() -> None:
    """Describe of a portal runs its command; the Execute that follows sends those rows without running again."""
    q, ran = queries()
    q.parse(cstr("") + cstr("SHOW STATS") + struct.pack("!h", 0))
    q.bind(bind(formats=(1,)))
    described = asyncio.run(q.describe(b"P" + cstr("")))
    assert described[:1] == b"T" and described.endswith(struct.pack("!h", 1)), described  # binary asked: binary said
    asyncio.run(q.execute(execute("", 0)))
    assert ran == ["SHOW STATS"]
    q.sync()
    with pytest.raises(ExtendedQueryError, match="does not exist"):
        asyncio.run(q.execute(execute("", 0)))  # the unnamed portal ends at Sync


def test_statement_describe_refuses_commands_with_effects() -> None:
    """Describing PAUSE as a statement does not run it; describing a SHOW does."""
    q, ran = queries()
    q.parse(cstr("a") + cstr("PAUSE") + struct.pack("!h", 0))
    with pytest.raises(ExtendedQueryError, match="has effects"):
        asyncio.run(q.describe(b"S" + cstr("a")))
    assert ran == []
    q.parse(cstr("b") + cstr("show stats") + struct.pack("!h", 0))
    assert asyncio.run(q.describe(b"S" + cstr("b")))[:1] == b"t"
    assert ran == ["show stats"]


def test_bind_refuses_parameters_and_unknown_names() -> None:
    """Parameters, unknown statements and a statement name used twice are errors a driver can show."""
    q, _ = queries()
    q.parse(cstr("s") + cstr("SHOW STATS") + struct.pack("!h", 0))
    with pytest.raises(ExtendedQueryError, match="take no parameters"):
        q.bind(bind(statement="s", params=1))
    with pytest.raises(ExtendedQueryError, match='"nope" does not exist'):
        q.bind(bind(statement="nope"))
    with pytest.raises(ExtendedQueryError, match="already exists"):
        q.parse(cstr("s") + cstr("SHOW STATS") + struct.pack("!h", 0))
    q.close(b"S" + cstr("s"))
    q.parse(cstr("s") + cstr("SHOW STATS") + struct.pack("!h", 0))
