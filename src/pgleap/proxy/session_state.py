"""Moving a client session's server-side state to another server at a transaction boundary (cutover,
rollback): its named prepared statements are prepared again and its settings set again, before the first
transaction the client sends there."""

from __future__ import annotations

import logging
import struct

from pgleap.protocol import codes
from pgleap.protocol.messages import cstr, message, parse_error
from pgleap.protocol.stream import read_message
from pgleap.proxy.backend import BackendConnection

log = logging.getLogger(__name__)

_MAX_ANSWER = 1 << 24
_FIRST_USER_OID = 16384  # user type OIDs differ between servers: let the new server infer those


async def restore_session_state(
    backend: BackendConnection,
    statements: list[tuple[str, str, tuple[int, ...]]],
    settings: list[tuple[str, str]],
    session_id: int,
) -> None:
    """Prepare `statements` (name, text, parameter types) and set `settings` on a fresh server connection.

    A statement the new server refuses is logged and left out: the client then gets the server's own
    error when it uses it, as it would after a DEALLOCATE, rather than failing the whole move.
    """
    chunks = []
    for name, sql, types in statements:
        oids = [0 if t >= _FIRST_USER_OID else t for t in types]
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
    chunks.append(message(codes.SYNC))
    backend.writer.write(b"".join(chunks))
    await backend.writer.drain()
    readies = sum(1 for c in chunks if c[0] == codes.SYNC)
    while readies:
        kind, body = await read_message(backend.reader, _MAX_ANSWER)
        if kind == codes.ERROR_RESPONSE:
            log.warning(
                "session %s: the new server refused part of the session's state: %s", session_id, parse_error(body)
            )
        elif kind == codes.READY_FOR_QUERY:
            readies -= 1
    log.info("session %s: moved %d prepared statements and %d settings", session_id, len(statements), len(settings))
