"""Moving a client session's server-side state to another server at a transaction boundary (cutover,
rollback): its named prepared statements are prepared again, its settings set again and its LISTENs
issued again, before the first transaction the client sends there.

What cannot move is found out first (`SERVER_STATE_SQL`, asked on the session's own idle connection): a
temporary table, a cursor held open across transactions, a session advisory lock. A switch waits for
sessions holding one (upgrade/switch.py) rather than drop it under the client.

Just before it moves, a session asks its old server what it set and what it prepared (`MOVABLE_STATE_SQL`);
a capturing session, which knows the client's own statement texts, asks only what it set
(`SESSION_SETTINGS_SQL`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import Any

from pgleap.protocol import codes
from pgleap.protocol.messages import cstr, message, parse_error, text_row, unpack_header
from pgleap.protocol.stream import read_message
from pgleap.proxy.backend import BackendConnection

log = logging.getLogger(__name__)

_MAX_ANSWER = 1 << 24
STATE_TIMEOUT = 2.0  # seconds one session's connection may take to say what it holds
# (named prepared statements as (name, text, parameter type OIDs), settings as (name, value))
MovableState = tuple[list[tuple[str, str, tuple[int, ...]]], list[tuple[str, str]]]


# At a transaction boundary only cursors declared WITH HOLD are open; pg_listening_channels() answers the
# LISTEN statements themselves, quoted by the server. Every function here exists on 9.0 and later.
SERVER_STATE_SQL = (
    "SELECT (SELECT string_agg('LISTEN ' || quote_ident(c), '; ') FROM pg_listening_channels() c),"
    " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind IN ('r', 'p')),"
    " (SELECT count(*) FROM pg_cursors WHERE is_holdable),"
    " (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory')"
)
# What a session set and prepared itself, one row each: ('S', name, text, parameter type OIDs) for a
# protocol-level prepared statement, ('G', name, value, NULL) for a SET. SQL-level PREPAREs are left out
# (their text is the client's whole query string, which may hold other statements); startup parameters
# (source 'client') go with the new connection's startup packet. Every column here exists on 9.0 and later.
SESSION_SETTINGS_SQL = "SELECT 'G', name, current_setting(name), NULL FROM pg_settings WHERE source = 'session'"
MOVABLE_STATE_SQL = (
    "SELECT 'S', name, statement, parameter_types::oid[]::text FROM pg_prepared_statements WHERE NOT from_sql"
    f" UNION ALL {SESSION_SETTINGS_SQL}"
)
_FORWARDED = (
    codes.NOTICE_RESPONSE,
    codes.NOTIFICATION_RESPONSE,
    codes.PARAMETER_STATUS,
)  # async messages: still the client's


@dataclass(frozen=True)
class ServerState:
    """What a session holds on its server connection between transactions, beyond statements and settings."""

    listen: str | None  # "LISTEN a; LISTEN b", or None
    temp_tables: int
    held_cursors: int
    advisory_locks: int

    @classmethod
    def from_row(cls, row: list[str | None]) -> ServerState:
        """SERVER_STATE_SQL's one row."""
        listen, temp, cursors, locks = row
        return cls(listen, int(temp or 0), int(cursors or 0), int(locks or 0))

    @property
    def unmovable(self) -> str | None:
        """What keeps the session on its server, in words, or None."""
        held = [
            f"{n} {what}"
            for n, what in (
                (self.temp_tables, "temporary tables"),
                (self.held_cursors, "cursors WITH HOLD"),
                (self.advisory_locks, "session advisory locks"),
            )
            if n
        ]
        return ", ".join(held) or None


class ServerStateReader(asyncio.Protocol):
    """Reads the rows of pgleap's own query off a session's server transport (lent by the forwarder while
    the session is idle); asynchronous messages arriving meanwhile still go to the client."""

    def __init__(self, client_transport: Any) -> None:
        self.client_transport = client_transport
        self.answer: asyncio.Future[list[list[str | None]]] = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._rows: list[list[str | None]] = []
        self._error: str | None = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        i = 0
        while len(buf) - i >= 5:
            kind, length = unpack_header(buf[i : i + 5])
            end = i + 5 + length
            if end > len(buf):
                break
            body = buf[i + 5 : end]
            if kind == codes.DATA_ROW:
                self._rows.append(text_row(body))
            elif kind == codes.ERROR_RESPONSE:
                self._error = parse_error(body).message
            elif kind in _FORWARDED:
                self.client_transport.write(buf[i:end])
            elif kind == codes.READY_FOR_QUERY and not self.answer.done():
                if self._error is not None:
                    self.answer.set_exception(RuntimeError(self._error))
                else:
                    self.answer.set_result(self._rows)
            i = end
        self._buf = buf[i:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("the server closed the connection"))


def movable_state(rows: list[list[str | None]]) -> MovableState:
    """MOVABLE_STATE_SQL's rows as restore_session_state takes them: (statements, settings)."""
    statements: list[tuple[str, str, tuple[int, ...]]] = []
    settings: list[tuple[str, str]] = []
    for kind, name, text, types in rows:
        if name is None or text is None:
            continue
        if kind == "S" and name:
            oids = tuple(int(t) for t in (types or "{}").strip("{}").split(",") if t)
            statements.append((name, text, oids))
        elif kind == "G":
            settings.append((name, text))
    return statements, settings


async def restore_session_state(
    backend: BackendConnection,
    statements: list[tuple[str, str, tuple[int, ...]]],
    settings: list[tuple[str, str]],
    session_id: int,
    listen: str | None = None,
) -> None:
    """Prepare `statements` (name, text, parameter types), set `settings` and run `listen` (LISTEN ...; ...)
    on a fresh server connection.

    A statement the new server refuses is logged and left out: the client then gets the server's own
    error when it uses it, as it would after a DEALLOCATE, rather than failing the whole move.
    """
    chunks = []
    for name, sql, types in statements:
        oids = [0 if t >= codes.FIRST_USER_OID else t for t in types]
        body = cstr(name) + cstr(sql) + struct.pack(f"!h{len(oids)}I", len(oids), *oids)
        chunks.append(message(codes.PARSE, body))
    for name, value in settings:
        # set_config through Parse/Bind: values are parameters, never spliced into SQL text.
        chunks.append(message(codes.PARSE, cstr("") + cstr("SELECT set_config($1, $2, false)") + struct.pack("!h", 0)))
        bind = cstr("") + cstr("") + struct.pack("!hh", 0, 2)
        for part in (name, value):
            encoded = part.encode()
            bind += struct.pack("!i", len(encoded)) + encoded
        chunks.append(message(codes.BIND, bind + struct.pack("!h", 0)))
        chunks.append(message(codes.EXECUTE, cstr("") + struct.pack("!i", 0)))
        chunks.append(message(codes.SYNC))  # one Sync each: a refused setting does not skip the others
    if listen:
        chunks.append(message(codes.QUERY, cstr(listen)))
    chunks.append(message(codes.SYNC))
    backend.writer.write(b"".join(chunks))
    await backend.writer.drain()
    readies = sum(1 for c in chunks if c[0] in (codes.SYNC, codes.QUERY))
    while readies:
        kind, body = await read_message(backend.reader, _MAX_ANSWER)
        if kind == codes.ERROR_RESPONSE:
            log.warning(
                "session %s: the new server refused part of the session's state: %s", session_id, parse_error(body)
            )
        elif kind == codes.READY_FOR_QUERY:
            readies -= 1
    log.info(
        "session %s: moved %d prepared statements, %d settings and %s",
        session_id,
        len(statements),
        len(settings),
        listen or "no LISTEN",
    )
