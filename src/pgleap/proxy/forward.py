"""The hot path: frame messages between a client and its server connection and forward the bytes.

Only message headers are read here, plus the bodies of ReadyForQuery and ParameterStatus.
Transaction boundaries (ReadyForQuery 'I' with nothing outstanding) are where a session may
be held by PAUSE or moved to another server when its route changes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from pgleap.protocol import codes
from pgleap.protocol.messages import cstr, error_response, message
from pgleap.proxy.backend import BackendConnection, connect_backend, send_cancel
from pgleap.proxy.session_state import (
    MOVABLE_STATE_SQL,
    SERVER_STATE_SQL,
    STATE_TIMEOUT,
    MovableState,
    ServerState,
    ServerStateReader,
    movable_state,
    restore_session_state,
)

if TYPE_CHECKING:
    from pgleap.proxy.route import Database
    from pgleap.proxy.session import Session

log = logging.getLogger(__name__)

_unpack_length = struct.Struct("!I").unpack_from
_now = time.perf_counter

_Q, _S, _F, _X = codes.QUERY, codes.SYNC, codes.FUNCTION_CALL, codes.TERMINATE
_Z, _C, _E, _PS = codes.READY_FOR_QUERY, codes.COMMAND_COMPLETE, codes.ERROR_RESPONSE, codes.PARAMETER_STATUS
_IDLE = ord("I")
_VALID_FRONTEND = bytes(1 if i in codes.FRONTEND_TYPES else 0 for i in range(256))
# Extended-protocol messages open a batch that only Sync closes; CopyData/CopyDone/CopyFail and
# Flush do not (after a simple-protocol COPY the session is idle again at ReadyForQuery).
_OPENS_BATCH = bytes(
    1 if i in (codes.PARSE, codes.BIND, codes.DESCRIBE, codes.EXECUTE, codes.CLOSE) else 0 for i in range(256)
)
_TERMINATE = message(codes.TERMINATE)


class _Side(asyncio.Protocol):
    """asyncio callbacks of one transport, delegating to the Forwarder."""

    def __init__(self, forwarder: Forwarder, client: bool) -> None:
        self.f = forwarder
        self.client = client
        self.data_received = forwarder.from_client if client else forwarder.from_server  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client:
            self.f.client_lost()
        else:
            self.f.server_lost(self)

    def eof_received(self) -> bool:
        return False  # close the transport; the peer is gone

    # Backpressure: when one side's write buffer fills, stop reading from the other.
    def pause_writing(self) -> None:
        self.f.block_reading(not self.client, "backpressure")

    def resume_writing(self) -> None:
        self.f.unblock_reading(not self.client, "backpressure")


class Forwarder:
    """Forwards one client session's traffic and tracks its transaction state."""

    def __init__(self, session: Session, backend: BackendConnection, client_transport: Any) -> None:
        self.session = session
        self.proxy = session.proxy
        assert session.database is not None
        self.database: Database = session.database
        self.stats = self.database.stats
        self.gate = self.proxy.gate
        self.route = self.database.route
        self.route_version = self.route.version
        self.max_size = self.proxy.config.proxy.max_message_size + 4
        self.backend = backend
        self.client_transport = client_transport
        self.server_transport: Any = None
        self._server_side: _Side | None = None
        self._client_side: _Side
        self.closed = asyncio.get_running_loop().create_future()

        self.pending: deque[float] = deque()  # start times of requests still awaiting ReadyForQuery
        self.tx_status = _IDLE
        self.open_batch = False  # extended-protocol messages sent since the last Sync
        self.held: bytes | None = None  # client bytes held at a transaction boundary
        self.capture: Any = None  # the Capture this session feeds (set by the capture path)
        self.last_server_type = 0
        self.terminating = False
        self._c_skip = 0
        self._c_buf = b""
        self._s_skip = 0
        self._s_buf = b""
        self._blocked: dict[bool, set[str]] = {True: set(), False: set()}
        self.server_state: ServerState | None = None  # asked at the last switch's pause; moves with the session

    # -- lifecycle ----------------------------------------------------------------

    def start(self, client_leftover: bytes, server_leftover: bytes) -> None:
        """Take over both transports from the handshake's streams."""
        self._client_side = _Side(self, client=True)
        if self.database.capture is not None:
            self._switch_capture(self.database.capture)
        self.client_transport.set_protocol(self._client_side)
        self._attach_server(self.backend)
        self.client_transport.resume_reading()
        if server_leftover:
            self.from_server(server_leftover)
        if client_leftover:
            self.from_client(client_leftover)

    def _attach_server(self, backend: BackendConnection) -> None:
        self.backend = backend
        self.server_transport = backend.writer.transport
        self._server_side = _Side(self, client=False)
        self.server_transport.set_protocol(self._server_side)
        self.server_transport.resume_reading()

    @property
    def in_transaction(self) -> bool:
        """True while the session is between the start and the end of a transaction."""
        return bool(self.pending) or self.open_batch or self.tx_status != _IDLE

    @property
    def quiescent(self) -> bool:
        """Between transactions with no message half-read either way: it may switch forwarders, or be asked."""
        return not (self.in_transaction or self._s_skip or self._s_buf or self._c_skip or self._c_buf)

    def close(self, error: bytes | None = None) -> None:
        """Close both connections; `error` is sent to the client first when its stream is clean."""
        if self.closed.done():
            return
        if error is not None and self._s_skip == 0 and not self._s_buf and not self.client_transport.is_closing():
            self.client_transport.write(error)
        self.client_transport.close()
        if self.server_transport is not None and not self.server_transport.is_closing():
            if not self.in_transaction and self.held is None:
                self.server_transport.write(_TERMINATE)
            self.server_transport.close()
        self.closed.set_result(None)
        self.gate.notify()

    def client_lost(self) -> None:
        """The client went away: cancel what it left running, then close its server connection."""
        if self.closed.done():
            return
        if self.pending:
            server, pid, secret = self.backend.server, self.backend.pid, self.backend.secret
            self.proxy.spawn(send_cancel(server, pid, secret))
        self.close()

    def server_lost(self, side: _Side) -> None:
        """The server connection broke: tell the client unless the server already sent its FATAL."""
        if side is not self._server_side or self.closed.done():
            return  # an old backend closed after a route switch
        error = None
        if not self.terminating and self.last_server_type != _E:
            error = error_response(
                f"server closed the connection unexpectedly ({self.backend.server.host}:{self.backend.server.port})",
                codes.CONNECTION_FAILURE,
                "FATAL",
                hint="pgleap lost its connection to the PostgreSQL server; reconnect to retry.",
            )
        self.close(error)

    def block_reading(self, client: bool, reason: str) -> None:
        """Stop reading one side for `reason` (backpressure, hold)."""
        blocked = self._blocked[client]
        if not blocked:
            transport = self.client_transport if client else self.server_transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()
        blocked.add(reason)

    def unblock_reading(self, client: bool, reason: str) -> None:
        """Undo `block_reading` for `reason`; reading resumes when no reason is left."""
        blocked = self._blocked[client]
        blocked.discard(reason)
        if not blocked:
            transport = self.client_transport if client else self.server_transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    # -- client -> server ----------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        """Frame client bytes and forward them, holding at a transaction boundary if needed."""
        if self.held is not None:
            self.held += data
            return
        stats = self.stats
        stats.bytes_in += len(data)
        if self._c_buf:
            data = self._c_buf + data
            self._c_buf = b""
        n = len(data)
        i = self._c_skip
        if i >= n:
            self._c_skip = i - n
            self.server_transport.write(data)
            return
        pending = self.pending
        while True:
            # A new message starts at i.
            if (
                not pending
                and self.tx_status == _IDLE
                and not self.open_batch
                and (
                    self.gate.paused
                    or self.route.version != self.route_version
                    or self.database.capture is not self.capture
                )
            ):
                self._hold(data, i)
                return
            if i + 5 > n:
                self._c_buf = data[i:]
                data = data[:i]
                i = n
                break
            kind = data[i]
            length = _unpack_length(data, i + 1)[0]
            if not _VALID_FRONTEND[kind] or length < 4 or length > self.max_size:
                self._protocol_violation(kind, length)
                return
            if kind == _Q or kind == _S or kind == _F:  # noqa: SIM109 (hot path: no tuple build)
                pending.append(_now())
                self.open_batch = False
            elif kind == _X:
                self.terminating = True
                self.server_transport.write(data[:i])
                self.close()
                return
            elif _OPENS_BATCH[kind]:
                self.open_batch = True
            i += 1 + length
            if i >= n:
                break
        self._c_skip = i - n
        if data:
            self.server_transport.write(data)

    def _must_hold(self) -> bool:
        """At a boundary: must the next transaction wait (PAUSE), move (route switch) or switch capture?"""
        return self.gate.paused or self.route.version != self.route_version or self.database.capture is not self.capture

    def _protocol_violation(self, kind: int, length: int) -> None:
        if not _VALID_FRONTEND[kind]:
            text = f"invalid frontend message type {kind}"
        else:
            text = f"invalid message length {length - 4} for message type {chr(kind)!r}"
        log.warning("session %s: %s; closing the connection", self.session.id, text)
        self.stats.client_errors += 1
        self.close(error_response(text, codes.PROTOCOL_VIOLATION, "FATAL"))

    def _hold(self, data: bytes, start: int) -> None:
        if start:
            self.server_transport.write(data[:start])
        self.held = data[start:]
        self.stats.bytes_in -= len(self.held)  # counted again when released
        self.block_reading(True, "hold")
        self.proxy.spawn(self._release())

    async def _release(self) -> None:
        """Wait for the gate and any route switch, then forward what was held."""
        try:
            while True:
                await self.gate.wait_resumed()
                if self.route.version != self.route_version:
                    await self._switch_backend()
                if self.database.capture is not self.capture:
                    self._switch_capture(self.database.capture)
                if not self.gate.paused or self.closed.done():
                    break
        except Exception as exc:
            self._cannot_move(exc)
            return
        if self.closed.done():
            return
        held, self.held = self.held or b"", None
        self.unblock_reading(True, "hold")
        self.from_client(held)

    def _switch_capture(self, capture: Any) -> None:
        """Start or stop capturing this session (at a transaction boundary, so no transaction is split)."""
        from pgleap.upgrade.capture.forwarding import CapturingForwarder  # the proxy does not need it otherwise

        if capture is None:
            self.__class__ = Forwarder
            self.capture = None
        else:
            self.__class__ = CapturingForwarder
            self.init_capture(capture)  # type: ignore[attr-defined]
        # uvloop caches a protocol's data_received when it is set: set the protocols again.
        self._client_side.data_received = self.from_client  # type: ignore[method-assign]
        if self.client_transport.get_protocol() is self._client_side:
            self.client_transport.set_protocol(self._client_side)
        if self._server_side is not None:
            self._server_side.data_received = self.from_server  # type: ignore[method-assign]
            self.server_transport.set_protocol(self._server_side)

    async def state_to_move(self) -> MovableState:
        """What must move with the session to another server: (named prepared statements, settings), asked
        of its server (MOVABLE_STATE_SQL) just before it moves; nothing when the old server cannot answer."""
        return await self._movable_from_server(MOVABLE_STATE_SQL) or ([], [])

    async def _movable_from_server(self, sql: str) -> MovableState | None:
        """MOVABLE_STATE_SQL (or SESSION_SETTINGS_SQL) asked of the old server; None when it cannot answer."""
        try:
            rows = await self._ask_own_server(sql, STATE_TIMEOUT)
        except Exception as exc:  # the old server is gone: the session moves with what pgleap knows
            log.warning("session %s: the old server did not say what the session set: %s", self.session.id, exc)
            return None
        return movable_state(rows)

    async def read_server_state(self, timeout: float) -> ServerState | None:
        """Ask the session's own server connection what it holds (SERVER_STATE_SQL), while the session is
        between transactions; None when it is not (ask again later)."""
        if self.held is not None and not self.gate.paused:
            return None  # about to be released into its next transaction
        rows = await self._ask_own_server(SERVER_STATE_SQL, timeout)
        return ServerState.from_row(rows[0]) if rows else None

    async def _ask_own_server(self, sql: str, timeout: float) -> list[list[str | None]]:
        """Run pgleap's own query on the session's server connection between transactions ([] when the
        session is inside one, or bytes are in flight)."""
        transport = self.server_transport
        if self.closed.done() or not self.quiescent or transport is None or transport.is_closing():
            return []
        side = self._server_side
        reader = ServerStateReader(self.client_transport)
        self.block_reading(True, "state")  # the client's next bytes wait in its socket meanwhile
        transport.set_protocol(reader)
        try:
            transport.write(message(codes.QUERY, cstr(sql)))
            return await asyncio.wait_for(reader.answer, timeout)
        finally:
            if not transport.is_closing():
                transport.set_protocol(side)
            self.unblock_reading(True, "state")

    def adopt_changes(self) -> None:
        """Take up a route or capture change now if the session is between transactions, rather than at its
        next one: an idle session (a pool's spare, a listener) may not send one for hours."""
        # Not with part of a message read: the forwarder taking over would not have it (it switches at the
        # message's end instead, as every busy session does).
        if self.held is None and self.quiescent and not self.closed.done() and self._must_hold():
            self._hold(b"", 0)

    async def move_now(self) -> None:
        """Move a session adopt_changes() holds to the route's server now, not when the gate resumes.

        For a listener, inside the switch's pause: a NOTIFY sent on the new server once clients resume
        must find its LISTEN there already.
        """
        if self.held is None or self.closed.done() or self.route.version == self.route_version:
            return
        try:
            await self._switch_backend()
        except Exception as exc:
            self._cannot_move(exc)

    def _cannot_move(self, exc: Exception) -> None:
        # The new server is unreachable: the client must hear why.
        log.error("session %s: cannot move to the new route: %s", self.session.id, exc)
        self.close(error_response(f"pgleap could not switch servers: {exc}", codes.CONNECTION_FAILURE, "FATAL"))

    async def _switch_backend(self) -> None:
        """Move this session to the route's current server at a transaction boundary."""
        version, server, role = self.route.version, self.route.server, self.route.role
        backend = await connect_backend(server, self.session.client_params, self.proxy.config.proxy.connect_timeout)
        statements, settings = await self.state_to_move()
        listen = self.server_state.listen if self.server_state is not None else None
        self.server_state = None
        if statements or settings or listen:
            await restore_session_state(backend, statements, settings, self.session.id, listen)
        old = self.server_transport
        changed = [m for m in backend.status_messages if m not in self.backend.status_messages]
        self._attach_server(backend)
        self.route_version = version
        self.session.server_role = role
        self.database.note_server_version(role, backend.server_version)
        if old is not None and not old.is_closing():
            old.write(_TERMINATE)
            old.close()
        for status in changed:
            self.client_transport.write(status)
        log.info("session %s moved to %s server %s", self.session.id, role, server.describe())

    # -- server -> client ----------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        """Frame server bytes, note ReadyForQuery and statuses, and forward them to the client."""
        if self._s_buf:
            data = self._s_buf + data
            self._s_buf = b""
        n = len(data)
        stats = self.stats
        stats.bytes_out += n
        i = self._s_skip
        if i >= n:
            self._s_skip = i - n
            self.client_transport.write(data)
            return
        kind = 0
        while True:
            if i + 5 > n:
                self._s_buf = data[i:]
                break
            kind = data[i]
            end = i + 1 + _unpack_length(data, i + 1)[0]
            if kind == _Z:
                if i + 6 > n:
                    self._s_buf = data[i:]
                    break
                self.tx_status = data[i + 5]
                if self.pending:
                    stats.latency.observe(_now() - self.pending.popleft())
                    stats.queries += 1
                if self.tx_status == _IDLE:
                    stats.transactions += 1
                    if self.gate.paused and not self.pending:
                        self.gate.notify()
            elif kind == _E:
                stats.errors += 1
            elif kind == _PS:
                if end > n:
                    self._s_buf = data[i:]
                    break
                self.session.note_parameter(data[i + 5 : end])
            i = end
            if i >= n:
                break
        self.last_server_type = kind
        if self._s_buf:
            stats.bytes_out -= len(self._s_buf)
            data = data[:i]
            self._s_skip = 0
        else:
            self._s_skip = i - n
        self.client_transport.write(data)
