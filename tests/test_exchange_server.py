"""The exchange tracker's model of PostgreSQL's answers, checked against real PG 10 and PG 18 servers."""

from __future__ import annotations

import asyncio
import copy
import struct

import pytest

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.protocol import codes
from pgleap.protocol.messages import cstr, message
from pgleap.protocol.stream import read_message
from pgleap.proxy.backend import connect_backend
from pgleap.upgrade.capture.exchange import ExchangeTracker, Outcome, Request

pytestmark = pytest.mark.integration


def parse(sql: str, name: str = "") -> bytes:
    return message(codes.PARSE, cstr(name) + cstr(sql) + struct.pack("!h", 0))


def bind(statement: str = "", portal: str = "") -> bytes:
    return message(codes.BIND, cstr(portal) + cstr(statement) + struct.pack("!hhh", 0, 0, 0))


def describe(kind: str, name: str = "") -> bytes:
    return message(codes.DESCRIBE, kind.encode() + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(codes.EXECUTE, cstr(portal) + struct.pack("!i", max_rows))


SYNC = message(codes.SYNC)


def query(sql: str) -> bytes:
    return message(codes.QUERY, cstr(sql))


# Each scenario: the raw messages, and the Request each one stands for.
SCENARIOS: dict[str, list[tuple[bytes, Request]]] = {
    "simple multi-statement with an error": [(query("select 1; select 1/0; select 2"), Request(codes.QUERY))],
    "empty query and a notice": [
        (query(""), Request(codes.QUERY)),
        (query("do $$ begin raise notice 'hello'; end $$"), Request(codes.QUERY)),
    ],
    "extended batch": [
        (parse("select $1::int + 1"), Request(codes.PARSE)),
        (bind(), Request(codes.BIND)),
        (describe("P"), Request(codes.DESCRIBE)),
        (execute(), Request(codes.EXECUTE)),
        (SYNC, Request(codes.SYNC)),
    ],
    "error then skipped requests until sync": [
        (parse("select 1/0"), Request(codes.PARSE)),
        (bind(), Request(codes.BIND)),
        (execute(), Request(codes.EXECUTE)),
        (parse("select 2"), Request(codes.PARSE)),
        (bind(), Request(codes.BIND)),
        (execute(), Request(codes.EXECUTE, injected=True)),
        (SYNC, Request(codes.SYNC)),
        (query("select 'after'"), Request(codes.QUERY)),
    ],
    "describe statement, portal suspended": [
        (parse("select generate_series(1, 3)", "s1"), Request(codes.PARSE)),
        (describe("S", "s1"), Request(codes.DESCRIBE, describe_statement=True)),
        (bind("s1", "p1"), Request(codes.BIND)),
        (execute("p1", 1), Request(codes.EXECUTE)),
        (execute("p1", 0), Request(codes.EXECUTE)),
        (message(codes.CLOSE, b"P" + cstr("p1")), Request(codes.CLOSE)),
        (SYNC, Request(codes.SYNC)),
    ],
    "copy in through a simple query": [
        (query("create temp table x(a int); copy x from stdin"), Request(codes.QUERY)),
        (message(codes.COPY_DATA, b"1\n2\n"), Request(codes.COPY_DATA)),
        (message(codes.COPY_DONE), Request(codes.COPY_DONE)),
    ],
    "copy out through extended execute": [
        (parse("copy (select generate_series(1, 3)) to stdout"), Request(codes.PARSE)),
        (bind(), Request(codes.BIND)),
        (execute(), Request(codes.EXECUTE)),
        (SYNC, Request(codes.SYNC)),
    ],
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_tracker_matches_real_server(backend: LabServer, scenario: str) -> None:
    """Every answer the server sends fits a request; every request gets its answer; tags are captured."""
    steps = copy.deepcopy(SCENARIOS[scenario])  # requests are stateful: fresh ones per run

    async def run() -> list[tuple[str, Outcome, str | None]]:
        server = ServerConfig(backend.host, backend.port, "postgres", backend.superuser, backend.password)
        conn = await connect_backend(server, {}, timeout=30)
        tracker = ExchangeTracker()
        seen: list[tuple[str, Outcome, str | None]] = []
        try:
            for raw, request in steps:
                conn.writer.write(raw)
                tracker.sent(request)
            await conn.writer.drain()
            while tracker.outstanding:
                kind, body = await asyncio.wait_for(read_message(conn.reader, 1 << 20), 30)
                request, outcome = tracker.received(kind, body)
                seen.append((chr(kind), outcome, request.tag if request else None))
        finally:
            conn.writer.close()
        return seen

    seen = asyncio.run(run())
    assert seen, "the server answered nothing"
    assert seen[-1][1] is Outcome.DONE and seen[-1][0] == "Z"
    tags = [tag for kind, _, tag in seen if kind == "C"]
    if scenario == "simple multi-statement with an error":
        assert [o for _, o, _ in seen if o is Outcome.FAILED] == [Outcome.FAILED]
        assert tags == ["SELECT 1"]
    if scenario == "copy in through a simple query":
        assert tags[-1] == "COPY 2"
    if scenario == "copy out through extended execute":
        assert tags == ["COPY 3"]
    if scenario == "error then skipped requests until sync":
        assert [k for k, o, _ in seen if o is Outcome.FAILED] == ["E"]
        assert tags[-1] == "SELECT 1"  # the query after Sync ran
