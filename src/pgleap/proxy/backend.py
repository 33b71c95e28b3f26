"""Opening and logging in a connection to a PostgreSQL server on a client's behalf."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from pgleap.config import ServerConfig
from pgleap.errors import AuthenticationError, ServerUnavailableError
from pgleap.protocol import codes
from pgleap.protocol.auth import authenticate_to_server
from pgleap.protocol.messages import ProtocolError, cancel_request, parse_error, startup_message
from pgleap.protocol.stream import read_message

# Startup parameters pgleap decides itself rather than passing on from the client.
_OWN_PARAMS = frozenset(["user", "database", "replication"])
_MAX_STARTUP_REPLY = 1024 * 1024


@dataclass
class BackendConnection:
    """A logged-in server connection, ready for the first query."""

    server: ServerConfig
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int
    secret: int
    parameters: dict[str, str] = field(default_factory=dict)
    status_messages: list[bytes] = field(default_factory=list)  # ParameterStatus, verbatim, in order

    @property
    def server_version(self) -> str:
        """The server's server_version parameter."""
        return self.parameters.get("server_version", "")


async def connect_backend(server: ServerConfig, client_params: dict[str, str], timeout: float) -> BackendConnection:
    """Connect and log in to `server` with the client's session parameters."""
    name = f"server {server.host}:{server.port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(server.host, server.port), timeout)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ServerUnavailableError(f"cannot connect to {name}: {reason}") from exc
    try:
        return await asyncio.wait_for(_login(server, name, reader, writer, client_params), timeout)
    except BaseException as exc:
        writer.close()
        if isinstance(exc, TimeoutError):
            raise ServerUnavailableError(f"{name} did not finish the login within {timeout:g}s") from exc
        if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)):
            raise ServerUnavailableError(f"{name} closed the connection during login") from exc
        raise


async def _login(
    server: ServerConfig,
    name: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    client_params: dict[str, str],
) -> BackendConnection:
    params = {"user": server.user, "database": server.database}
    params.update((k, v) for k, v in client_params.items() if k not in _OWN_PARAMS)
    writer.write(startup_message(params))
    await writer.drain()
    await authenticate_to_server(reader, writer, server.user, server.password, name)
    conn = BackendConnection(server=server, reader=reader, writer=writer, pid=0, secret=0)
    while True:
        kind, body = await read_message(reader, _MAX_STARTUP_REPLY)
        if kind == codes.READY_FOR_QUERY:
            return conn
        if kind == codes.PARAMETER_STATUS:
            key, value, _ = body.split(b"\0", 2)
            conn.parameters[key.decode()] = value.decode()
            conn.status_messages.append(bytes((kind,)) + struct.pack("!I", len(body) + 4) + body)
        elif kind == codes.BACKEND_KEY_DATA:
            conn.pid, conn.secret = struct.unpack_from("!iI", body)
        elif kind == codes.ERROR_RESPONSE:
            error = parse_error(body)
            raise ServerUnavailableError(f"{name} refused the session: {error.message} (SQLSTATE {error.sqlstate})")
        elif kind != codes.NOTICE_RESPONSE:
            raise ProtocolError(f"{name} sent unexpected message type {chr(kind)!r} during startup")


async def send_cancel(server: ServerConfig, pid: int, secret: int, timeout: float = 5.0) -> None:
    """Ask `server` to cancel what backend `pid` is running (best effort, like libpq's PQcancel)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(server.host, server.port), timeout)
    except (OSError, TimeoutError):
        return
    try:
        writer.write(cancel_request(pid, secret))
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


__all__ = ["AuthenticationError", "BackendConnection", "connect_backend", "send_cancel"]
