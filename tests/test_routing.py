"""Routing: by database name, route switches without reconnecting, protocol negotiation, unreachable routes."""

from __future__ import annotations

import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.testing import ProxyThread

from conftest import run_tool, start_proxy, tool

pytestmark = pytest.mark.integration


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_config(server: LabServer) -> ServerConfig:
    return ServerConfig(server.host, server.port, "postgres", server.superuser, server.password)


def switch_route(p: ProxyThread, database: str, server: LabServer, role: str) -> None:
    """Switch `database`'s route to `server` on the proxy's loop, as the upgrade engine will."""
    assert p.proxy is not None
    route = p.proxy.databases[database].route

    async def switch() -> int:
        route.switch(server_config(server), role)
        return route.version

    p.call(switch())


def version_num(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("select current_setting('server_version_num')").fetchone()[0])  # type: ignore[index]


@pytest.fixture
def old_proxy(tmp_path: Path, pg_old: LabServer) -> Iterator[ProxyThread]:
    """pgleap with database "app" routed to pg_old."""
    p = start_proxy(tmp_path, {"app": pg_old})
    yield p
    p.stop()


@pytest.fixture
def table_on_both(pg_old: LabServer, pg_new: LabServer) -> Iterator[str]:
    """The same fresh table on pg_old and pg_new."""
    name = f"t_route_{uuid.uuid4().hex[:8]}"
    for server in (pg_old, pg_new):
        server.psql(f"create table {name}(id int primary key)")
    yield name
    for server in (pg_old, pg_new):
        server.psql(f"drop table if exists {name}")


def ids(server: LabServer, table: str) -> list[int]:
    out = server.psql(f"select id from {table} order by id")
    return [int(x) for x in out.split()]


def test_clients_routed_by_database_name(tmp_path: Path, pg_old: LabServer, pg_new: LabServer) -> None:
    """Two [[auto_upgrade]] entries: database "old" reaches PG 10, database "new" reaches PG 18, side by side."""
    p = start_proxy(tmp_path, {"old": pg_old, "new": pg_new})
    try:
        with (
            psycopg.connect(p.dsn("old"), autocommit=True) as old,
            psycopg.connect(p.dsn("new"), autocommit=True) as new,
        ):
            assert version_num(old) // 10000 == pg_old.major
            assert version_num(new) // 10000 == pg_new.major
            assert old.info.parameter_status("server_version").startswith(f"{pg_old.major}.")
            assert new.info.parameter_status("server_version").startswith(f"{pg_new.major}.")
            assert old.execute("select inet_server_port()").fetchone() == (pg_old.port,)
            assert new.execute("select inet_server_port()").fetchone() == (pg_new.port,)
    finally:
        p.stop()


def test_route_switch_moves_idle_client_without_reconnect(
    old_proxy: ProxyThread, pg_old: LabServer, pg_new: LabServer
) -> None:
    """After a route switch the same client connection's next transaction runs on the new server."""
    with psycopg.connect(old_proxy.dsn(), autocommit=True) as conn:
        assert version_num(conn) // 10000 == pg_old.major
        old_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        switch_route(old_proxy, "app", pg_new, "target")
        assert version_num(conn) // 10000 == pg_new.major
        assert conn.execute("select inet_server_port()").fetchone() == (pg_new.port,)
        assert conn.info.parameter_status("server_version").startswith(f"{pg_new.major}.")
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != old_pid  # type: ignore[index]
        # And back again: the route is a value that can move either way.
        switch_route(old_proxy, "app", pg_old, "source")
        assert version_num(conn) // 10000 == pg_old.major
        assert conn.info.parameter_status("server_version").startswith(f"{pg_old.major}.")


def test_route_switch_waits_for_commit(
    old_proxy: ProxyThread, pg_old: LabServer, pg_new: LabServer, table_on_both: str
) -> None:
    """A switch requested mid-transaction takes effect only after COMMIT: that transaction's rows land on the old server."""
    table = table_on_both
    with psycopg.connect(old_proxy.dsn(), autocommit=False) as conn:
        conn.execute(f"insert into {table} values (1)")
        switch_route(old_proxy, "app", pg_new, "target")
        conn.execute(f"insert into {table} values (2)")
        assert version_num(conn) // 10000 == pg_old.major, "the switch cut into a running transaction"
        conn.commit()
        conn.execute(f"insert into {table} values (3)")
        assert version_num(conn) // 10000 == pg_new.major
        conn.commit()
    assert ids(pg_old, table) == [1, 2]
    assert ids(pg_new, table) == [3]


def test_psql_protocol_3_2_negotiates_down(old_proxy: ProxyThread) -> None:
    """PG 18 psql asking for protocol 3.2 connects through pgleap (NegotiateProtocolVersion to 3.0) and queries."""
    out = run_tool(
        [tool("psql"), old_proxy.dsn(max_protocol_version="3.2"), "-X", "-At", "-c", "select 'negotiated' || 1"],
        timeout=60,
    )
    assert out.stdout.strip() == "negotiated1"
    out = run_tool(
        [tool("psql"), old_proxy.dsn(max_protocol_version="latest"), "-X", "-At", "-c", "select 2"], timeout=60
    )
    assert out.stdout.strip() == "2"


def test_negotiate_protocol_version_message(old_proxy: ProxyThread) -> None:
    """A raw 3.2 startup with a _pq_ option gets NegotiateProtocolVersion(3.0, [option]) before authentication."""
    params = b"user\0app\0database\0app\0_pq_.test_option\0on\0\0"
    startup = struct.pack("!ii", 8 + len(params), (3 << 16) | 2) + params
    with socket.create_connection(("127.0.0.1", old_proxy.port), timeout=20) as sock:
        sock.sendall(startup)
        reader = sock.makefile("rb")
        kind = reader.read(1)
        length = struct.unpack("!i", reader.read(4))[0]
        body = reader.read(length - 4)
        assert kind == b"v", f"expected NegotiateProtocolVersion, got {kind!r}"
        version, count = struct.unpack_from("!ii", body)
        # Like PostgreSQL (PG_PROTOCOL_LATEST / FrontendProtocol), the full version: major << 16 | minor.
        assert version == (3 << 16) | 0, f"NegotiateProtocolVersion offers {version >> 16}.{version & 0xFFFF}"
        assert count == 1 and body[8:].rstrip(b"\0") == b"_pq_.test_option"
        kind = reader.read(1)
        assert kind == b"R", "authentication should follow"


def test_unknown_database_and_down_server(tmp_path: Path, pg_old: LabServer, pg_new: LabServer) -> None:
    """Unknown database and unreachable server give FATALs naming the problem; other databases keep serving."""
    dead_port = free_port()
    dead = SimpleNamespace(host="127.0.0.1", port=dead_port, superuser="postgres", password="x")
    p = start_proxy(tmp_path, {"app": pg_new, "gone": dead})  # type: ignore[dict-item]
    try:
        with psycopg.connect(p.dsn(), autocommit=True) as survivor:
            with pytest.raises(psycopg.OperationalError) as info:
                psycopg.connect(p.dsn("no_such_db"), connect_timeout=20)
            assert "FATAL" in str(info.value) and 'database "no_such_db" does not exist' in str(info.value)
            with pytest.raises(psycopg.OperationalError) as info:
                psycopg.connect(p.dsn("gone"), connect_timeout=20)
            message = str(info.value)
            assert "FATAL" in message and "cannot reach" in message and f"127.0.0.1:{dead_port}" in message, message
            assert survivor.execute("select 1").fetchone() == (1,)
        with psycopg.connect(p.dsn(), connect_timeout=20) as fresh:
            assert version_num(fresh) // 10000 == pg_new.major
    finally:
        p.stop()


def test_route_switch_to_down_server_gives_clear_fatal(old_proxy: ProxyThread, pg_old: LabServer) -> None:
    """A switch to an unreachable server gives the moved client a FATAL saying why; the proxy keeps serving."""
    dead = SimpleNamespace(host="127.0.0.1", port=free_port(), superuser="postgres", password="x")
    with psycopg.connect(old_proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        switch_route(old_proxy, "app", dead, "target")  # type: ignore[arg-type]
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert "could not switch servers" in str(info.value) and str(dead.port) in str(info.value), str(info.value)
    switch_route(old_proxy, "app", pg_old, "source")
    with psycopg.connect(old_proxy.dsn(), connect_timeout=20) as conn:
        assert version_num(conn) // 10000 == pg_old.major
