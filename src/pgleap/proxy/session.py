"""A client session: the startup handshake (TLS, protocol version, authentication), then forwarding."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING

from pgleap.config.schema import ADMIN_DATABASE, ServerConfig
from pgleap.errors import AuthenticationError, ServerUnavailableError
from pgleap.protocol import codes
from pgleap.protocol.auth import Credential, authenticate_client
from pgleap.protocol.messages import (
    ProtocolError,
    backend_key_data,
    error_response,
    negotiate_protocol_version,
    parse_startup_params,
    ready_for_query,
)
from pgleap.protocol.stream import read_startup
from pgleap.proxy.backend import BackendConnection, connect_backend
from pgleap.proxy.forward import Forwarder
from pgleap.proxy.read_shift import ReadShiftForwarder, chosen, read_only_session
from pgleap.proxy.route import READ_SHIFT_ROLE, Database

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy

log = logging.getLogger(__name__)

_HANDSHAKE_TIMEOUT = 60.0  # a client that never finishes logging in is dropped, as with authentication_timeout


class Session:
    """One client connection to pgleap."""

    def __init__(
        self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session_id: int
    ) -> None:
        self.proxy = proxy
        self.id = session_id
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.client_addr: str = str(peer[0])
        self.client_port: int = int(peer[1]) if len(peer) > 1 else 0
        self.connected_at = time.time()
        self.user = ""
        self.client_params: dict[str, str] = {}
        self.parameters: dict[str, str] = {}  # as last reported by the server (ParameterStatus)
        self.database: Database | None = None
        self.server_role = "source"
        self.tls = False
        self.key = (0, 0)  # the BackendKeyData pgleap gave this client
        self.forwarder: Forwarder | None = None
        self._console = False  # logged in to the admin console (database "pgleap")

    async def run(self) -> None:
        """Serve the connection until it closes."""
        try:
            await asyncio.wait_for(self._handshake(), _HANDSHAKE_TIMEOUT)
        except _Refused as refused:
            self._refuse(refused.message, refused.sqlstate)
            return
        except ProtocolError as exc:
            self._refuse(str(exc), codes.PROTOCOL_VIOLATION)
            return
        except TimeoutError:
            self._refuse("timeout expired while logging in", codes.PROTOCOL_VIOLATION)
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.writer.close()
            return
        if self._console:
            # Outside the handshake's timeout: a console session lives as long as the DBA keeps it open.
            await self.proxy.admin.serve(self)
        elif self.forwarder is not None:
            await self.forwarder.closed

    def _refuse(self, text: str, sqlstate: str) -> None:
        log.info("session %s from %s: %s", self.id, self.client_addr, text)
        if self.database is not None:
            self.database.stats.client_errors += 1
        if not self.writer.is_closing():
            self.writer.write(error_response(text, sqlstate, "FATAL"))
            self.writer.close()

    async def _handshake(self) -> None:
        params = await self._read_startup()
        if params is None:
            return
        self.client_params = params
        self.user = params.get("user", "")
        if not self.user:
            raise _Refused("no PostgreSQL user name specified in startup packet", codes.INVALID_AUTHORIZATION)
        database_name = params.get("database") or self.user
        config = self.proxy.config

        if database_name == ADMIN_DATABASE:
            await self._authenticate(
                Credential("scram-sha-256", password=config.admin.password) if self.user == config.admin.user else None
            )
            self._console = True
            return

        if self.proxy.client_count() > config.proxy.max_client_connections:
            raise _Refused("sorry, too many clients already", codes.TOO_MANY_CONNECTIONS)
        user = config.user(self.user)
        credential = (
            Credential(user.auth_method, user.password, user.scram_verifier, user.md5_hash)
            if user is not None
            else None
        )
        await self._authenticate(credential)
        self.database = self.proxy.databases.get(database_name)
        if self.database is None:
            raise _Refused(f'database "{database_name}" does not exist', codes.INVALID_CATALOG_NAME)
        if self.proxy.shutting_down:
            raise _Refused("pgleap is shutting down", codes.ADMIN_SHUTDOWN)

        route = self.database.route
        version, server, role = route.version, route.server, route.role
        shift = self.proxy.read_shift_server(self.database)
        if shift is not None and read_only_session(params) and chosen(self.database.upgrade.cutover.read_shift_percent):
            server, role = shift, READ_SHIFT_ROLE
        try:
            backend = await self._connect(server, role, params)
        except (ServerUnavailableError, AuthenticationError):
            server, role = route.server, route.role  # the shift is optional: read from the source then
            backend = await self._connect(server, role, params)
        self.server_role = role
        self.parameters = dict(backend.parameters)
        self.database.note_server_version(role, backend.server_version)
        self.key = self.proxy.register_cancel_key(self)
        self.writer.write(b"".join(backend.status_messages) + backend_key_data(*self.key) + ready_for_query())
        client_leftover = bytes(getattr(self.reader, "_buffer", b""))
        server_leftover = bytes(getattr(backend.reader, "_buffer", b""))
        forwarder = ReadShiftForwarder if role == READ_SHIFT_ROLE else Forwarder
        self.forwarder = forwarder(self, backend, self.writer.transport)
        # A route switch while connecting: the session moves at its first boundary.
        self.forwarder.route_version = version if role == READ_SHIFT_ROLE or backend.server is route.server else -1
        self.forwarder.start(client_leftover, server_leftover)

    async def _connect(self, server: ServerConfig, role: str, params: dict[str, str]) -> BackendConnection:
        try:
            return await connect_backend(server, params, self.proxy.config.proxy.connect_timeout)
        except (ServerUnavailableError, AuthenticationError) as exc:
            log.error("session %s: %s server: %s", self.id, role, exc)
            if role != READ_SHIFT_ROLE:
                raise _Refused(
                    f"pgleap cannot reach the {role} server: {exc}", codes.SQLCLIENT_UNABLE_TO_ESTABLISH
                ) from exc
            raise

    async def _authenticate(self, credential: Credential | None) -> None:
        try:
            await authenticate_client(self.reader, self.writer, self.user, credential)
        except AuthenticationError as exc:
            raise _Refused(str(exc), codes.INVALID_PASSWORD) from exc

    async def _read_startup(self) -> dict[str, str] | None:
        """Answer SSL/GSSENC requests and cancel requests; return the startup parameters."""
        while True:
            code, rest = await read_startup(self.reader)
            if code == codes.SSL_REQUEST:
                await self._start_tls()
            elif code == codes.GSSENC_REQUEST:
                self.writer.write(b"N")
            elif code == codes.CANCEL_REQUEST:
                if len(rest) >= 8:
                    await self.proxy.forward_cancel(
                        int.from_bytes(rest[:4], "big", signed=True), int.from_bytes(rest[4:8], "big")
                    )
                self.writer.close()
                return None
            elif code >> 16 == 3:
                params = parse_startup_params(rest)
                minor = code & 0xFFFF
                unsupported = [k for k in params if k.startswith("_pq_.")]
                if minor > 0 or unsupported:
                    self.writer.write(negotiate_protocol_version(0, unsupported))
                return {k: v for k, v in params.items() if not k.startswith("_pq_.")}
            else:
                raise _Refused(
                    f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0 to 3.0",
                    codes.FEATURE_NOT_SUPPORTED,
                )

    async def _start_tls(self) -> None:
        context = self.proxy.tls_context
        if context is None or self.tls:
            self.writer.write(b"N")
            return
        self.writer.write(b"S")
        await self.writer.drain()
        await self.writer.start_tls(context)
        self.tls = True

    def note_parameter(self, body: bytes) -> None:
        """Record a ParameterStatus the server sent (name NUL value NUL)."""
        name, value, _ = body.split(b"\0", 2)
        self.parameters[name.decode()] = value.decode(errors="replace")

    @property
    def state(self) -> str:
        """idle, active, in transaction, held (by PAUSE or a route switch) or closed."""
        f = self.forwarder
        if f is None:
            return "admin" if self.server_role == "admin" else "login"
        if f.closed.done():
            return "closed"
        if f.held is not None:
            return "held"
        if f.pending:
            return "active"
        return "in transaction" if f.in_transaction else "idle"

    def new_key(self) -> tuple[int, int]:
        """A fresh (pid, secret) for BackendKeyData."""
        return (secrets.randbelow(2**31 - 1) + 1, secrets.randbits(32))


class _Refused(Exception):
    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
