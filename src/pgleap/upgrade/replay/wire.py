"""Replaying statements on the target over pgleap's own protocol connection, pipelined.

Statements go out as the client sent them: Parse with the captured parameter types, Bind with the
captured formats and values (results in text), Execute. COPY FROM STDIN goes out as a simple Query
followed by its captured CopyData and a CopyDone. Answers are paired with requests by the capture
path's ExchangeTracker, which also knows that after an error the server skips everything up to Sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pgleap.config import ServerConfig
from pgleap.errors import AuthenticationError, ServerUnavailableError
from pgleap.protocol import codes
from pgleap.protocol.messages import ProtocolError, ServerError, cstr, message, parse_error, text_row
from pgleap.proxy.backend import BackendConnection, connect_backend
from pgleap.upgrade.capture.exchange import ExchangeError, ExchangeTracker, Outcome, Request
from pgleap.upgrade.replay.errors import TargetRefusedError, TransientApplyError, is_transient

CONNECT_TIMEOUT = 10.0
_MAX_ANSWER = 1 << 30
_COPY_FROM_STDIN = re.compile(r"^\s*copy\b.*\bfrom\s+stdin\b", re.IGNORECASE | re.DOTALL)
_FINAL = frozenset([codes.EXECUTE, codes.QUERY, codes.SYNC])  # requests whose answer completes a slot
_CHUNK = 1 << 20  # CopyData payloads are sent in pieces of this size
_READ_SIZE = 1 << 16  # answers are read in pieces of up to this size, then framed
_LENGTH = struct.Struct("!i")

# The replay session's own settings: no timeout may cut a long replayed statement, and text travels as UTF-8.
# Only settings every supported major knows go in the startup packet (a server refuses the session over
# one it does not know); the timeouts later majors added are switched off after the login, where they exist.
SESSION_PARAMS = {
    "application_name": "pgleap_replay",
    "client_encoding": "UTF8",
    "statement_timeout": "0",
}
_NO_TIMEOUTS = (
    "SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN "
    "('lock_timeout', 'idle_in_transaction_session_timeout', 'idle_session_timeout', 'transaction_timeout')"
)


@dataclass
class Slot:
    """One request's place in a pipeline and, once answered, its tag or error."""

    label: str  # what it is, for messages ("statement 3 of position 17", "COMMIT")
    tag: str | None = None
    error: ServerError | None = None
    answered: bool = False
    answered_at: float = 0.0  # time.monotonic() when the answer was complete
    # A read's RowDescription and DataRows go here (result comparison); None: rows are not expected.
    sink: Callable[[int, bytes], None] | None = None
    # Its errors are an outcome, never a reason to reconnect (a compared read that timed out, say).
    tolerant: bool = False


@dataclass
class Pipeline:
    """Messages for one round trip, with a Slot for every request whose answer matters."""

    chunks: list[bytes] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def extended(
        self,
        sql: str,
        params: tuple[bytes | None, ...] = (),
        formats: tuple[int, ...] = (),
        types: tuple[int, ...] = (),
        label: str = "",
    ) -> Slot:
        """Parse/Bind/Execute of `sql` on the unnamed statement and portal."""
        slot = Slot(label or sql)
        self._parse_bind(sql, params, formats, types, slot)
        self._add(codes.EXECUTE, cstr("") + struct.pack("!i", 0), slot)
        return slot

    def read(
        self,
        sql: str,
        params: tuple[bytes | None, ...],
        formats: tuple[int, ...],
        types: tuple[int, ...],
        slot: Slot,
    ) -> Slot:
        """Parse/Bind/Describe/Execute of a read whose RowDescription and rows go to `slot.sink` (in text)."""
        self._parse_bind(sql, params, formats, types, slot)
        self._add(codes.DESCRIBE, b"P" + cstr(""), slot)
        self._add(codes.EXECUTE, cstr("") + struct.pack("!i", 0), slot)
        return slot

    def _parse_bind(
        self, sql: str, params: tuple[bytes | None, ...], formats: tuple[int, ...], types: tuple[int, ...], slot: Slot
    ) -> None:
        oids = [0 if t >= codes.FIRST_USER_OID else t for t in types]
        # Parse and Bind carry the slot too: an unknown table fails at Parse, a bad parameter at Bind.
        self._add(codes.PARSE, cstr("") + cstr(sql) + struct.pack(f"!h{len(oids)}I", len(oids), *oids), slot)
        bind = bytearray(cstr("") + cstr(""))
        bind += struct.pack(f"!h{len(formats)}h", len(formats), *formats)
        bind += struct.pack("!h", len(params))
        for value in params:
            bind += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
        bind += struct.pack("!h", 0)  # every result column in text
        self._add(codes.BIND, bytes(bind), slot)

    def copy_in(self, sql: str, data: bytes | None, label: str = "") -> Slot:
        """COPY ... FROM STDIN as a simple Query, its data and CopyDone, without waiting for CopyInResponse."""
        slot = Slot(label or sql)
        self._add(codes.QUERY, cstr(sql), slot)
        payload = data or b""
        for start in range(0, len(payload), _CHUNK):
            self.chunks.append(message(codes.COPY_DATA, payload[start : start + _CHUNK]))
        self.chunks.append(message(codes.COPY_DONE))
        return slot

    def sync(self) -> Slot:
        """End the pipeline: the server answers ReadyForQuery (and stops skipping after an error)."""
        slot = Slot("Sync")
        self._add(codes.SYNC, b"", slot)
        return slot

    def _add(self, kind: int, body: bytes, slot: Slot | None) -> None:
        self.chunks.append(message(kind, body))
        self.requests.append(Request(kind, context=slot))


def is_copy_from_stdin(sql: str) -> bool:
    """Whether a captured statement is a COPY ... FROM STDIN (replayed with its data)."""
    return bool(_COPY_FROM_STDIN.match(sql))


class TargetSession:
    """One logged-in connection to the target, used by one replayer at a time."""

    def __init__(self, conn: BackendConnection) -> None:
        self.conn = conn
        self.status = b"I"  # the last ReadyForQuery's transaction status
        self._unread = bytearray()  # bytes read from the target beyond the last message handed out

    @classmethod
    async def open(cls, server: ServerConfig, timeout: float = CONNECT_TIMEOUT) -> TargetSession:
        """Connect and log in; connection failures are transient, a refused login is not."""
        try:
            conn = await connect_backend(server, dict(SESSION_PARAMS), timeout)
        except ServerUnavailableError as exc:
            raise TransientApplyError(f"target {server.host}:{server.port}: {exc}") from exc
        except AuthenticationError:
            raise
        session = cls(conn)
        try:
            await asyncio.wait_for(session.query(_NO_TIMEOUTS), timeout)
        except BaseException as exc:
            session.close()
            if isinstance(exc, TimeoutError):
                where = f"{server.host}:{server.port}"
                raise TransientApplyError(f"target {where} did not answer within {timeout:g}s") from exc
            raise
        return session

    async def next_message(self) -> tuple[int, bytes]:
        """The target's next message: (type, body); ProtocolError when it is oversized or malformed.

        Framed from reads of whatever has arrived: a pipeline's answers come many to a read, and two
        readexactly() calls per message cost more than the rest of handling them.
        """
        buf = self._unread
        while True:
            if len(buf) >= 5:
                (length,) = _LENGTH.unpack_from(buf, 1)
                if length < 4 or length - 4 > _MAX_ANSWER:
                    raise ProtocolError(f"the target sent a message length of {length}")
                if len(buf) > length:
                    kind, body = buf[0], bytes(buf[5 : 1 + length])
                    del buf[: 1 + length]
                    return kind, body
            chunk = await self.conn.reader.read(_READ_SIZE)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buf), None)
            buf += chunk

    @property
    def pid(self) -> int:
        """The target backend's process id (pg_stat_activity.pid)."""
        return self.conn.pid

    def close(self) -> None:
        """Close the connection without waiting (a Terminate first when it is still writable)."""
        writer = self.conn.writer
        if not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(message(codes.TERMINATE))
            writer.close()

    async def run(self, pipeline: Pipeline) -> bytes:
        """Send the whole pipeline in one write, read every answer; returns the final transaction status."""
        tracker = ExchangeTracker()
        for request in pipeline.requests:
            tracker.sent(request)
        writer = self.conn.writer
        try:
            # Write without draining first: the server answers while we still send, and asyncio's
            # transport keeps sending while we read, so a large pipeline cannot deadlock on full buffers.
            writer.write(b"".join(pipeline.chunks))
            while tracker.outstanding:
                kind, body = await self.next_message()
                self._answer(tracker, kind, body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise TransientApplyError(f"connection to the target lost: {_lost(exc)}") from exc
        except (ProtocolError, ExchangeError) as exc:
            raise TransientApplyError(f"the target's answers did not fit the pipeline ({exc}); reconnecting") from exc
        return self.status

    def _answer(self, tracker: ExchangeTracker, kind: int, body: bytes) -> None:
        request, outcome = tracker.received(kind, body)
        slot = request.context if request is not None and isinstance(request.context, Slot) else None
        if kind == codes.ERROR_RESPONSE:
            error = parse_error(body)
            if error.severity in ("FATAL", "PANIC") or (
                is_transient(error.sqlstate) and (slot is None or not slot.tolerant)
            ):
                raise TransientApplyError(f"target: {error}")
        if kind == codes.READY_FOR_QUERY:
            self.status = body[:1]
        if slot is None:
            return
        if slot.sink is not None and kind in (codes.DATA_ROW, codes.ROW_DESCRIPTION):
            slot.sink(kind, body)
        if outcome is Outcome.FAILED and slot.error is None:
            slot.error = parse_error(body)
            slot.answered = True
            slot.answered_at = time.monotonic()
        elif outcome is Outcome.DONE and not slot.answered and request is not None and request.kind in _FINAL:
            slot.tag = request.tag
            slot.answered = True
            slot.answered_at = time.monotonic()

    async def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run a simple query of pgleap's own; rows in text. A server error raises TargetRefusedError."""
        rows, _ = await self._simple(sql)
        return rows

    async def execute(self, sql: str) -> str:
        """Run a statement of pgleap's own; its command tag. A server error raises TargetRefusedError."""
        _, tag = await self._simple(sql)
        return tag

    async def _simple(self, sql: str) -> tuple[list[tuple[str | None, ...]], str]:
        try:
            self.conn.writer.write(message(codes.QUERY, cstr(sql)))
            await self.conn.writer.drain()
            rows, tag, error = await self._until_ready(await self.next_message())
        except (OSError, asyncio.IncompleteReadError, ConnectionError, ProtocolError) as exc:
            raise TransientApplyError(f"connection to the target lost: {_lost(exc)}") from exc
        if error is not None:
            raise TargetRefusedError(f"the target refused pgleap's statement {sql!r}: {error}", error.sqlstate)
        return rows, tag

    async def copy_in_stream(self, sql: str, data: AsyncIterator[bytes]) -> str:
        """COPY ... FROM STDIN fed from `data` as it comes; the command tag. A server error raises
        TargetRefusedError; an error raised by `data` aborts the COPY (CopyFail) and is raised again."""
        writer = self.conn.writer
        failure: BaseException | None = None
        try:
            writer.write(message(codes.QUERY, cstr(sql)))
            answer = await self.next_message()
            if answer[0] == codes.COPY_IN_RESPONSE:
                try:
                    async for chunk in data:
                        writer.write(message(codes.COPY_DATA, chunk))
                        await writer.drain()
                except Exception as exc:
                    failure = exc
                    writer.write(message(codes.COPY_FAIL, cstr(f"pgleap: the source side failed: {exc}")))
                else:
                    writer.write(message(codes.COPY_DONE))
                answer = await self.next_message()
            _, tag, error = await self._until_ready(answer)
        except (OSError, asyncio.IncompleteReadError, ConnectionError, ProtocolError) as exc:
            raise TransientApplyError(f"connection to the target lost: {_lost(exc)}") from exc
        if failure is not None:
            raise failure
        if error is not None:
            raise TargetRefusedError(f"the target refused pgleap's {sql!r}: {error}")
        return tag

    async def _until_ready(
        self, answer: tuple[int, bytes]
    ) -> tuple[list[tuple[str | None, ...]], str, ServerError | None]:
        """The answers of one simple query, from `answer` on: rows, the last command tag, the first error."""
        rows: list[tuple[str | None, ...]] = []
        tag = ""
        error: ServerError | None = None
        kind, body = answer
        while True:
            if kind == codes.DATA_ROW:
                rows.append(tuple(text_row(body)))
            elif kind == codes.COMMAND_COMPLETE:
                tag = body.rstrip(b"\0").decode()
            elif kind == codes.ERROR_RESPONSE:
                error = error or parse_error(body)
                if is_transient(error.sqlstate) or error.severity in ("FATAL", "PANIC"):
                    raise TransientApplyError(f"target: {error}")
            elif kind == codes.READY_FOR_QUERY:
                self.status = body[:1]
                return rows, tag, error
            kind, body = await self.next_message()


def _lost(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the target closed the connection"
    return str(exc) or type(exc).__name__
