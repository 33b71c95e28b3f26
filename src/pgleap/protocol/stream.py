"""Reading whole messages from asyncio streams, for the handshake and the admin console."""

from __future__ import annotations

import asyncio
import struct

from pgleap.protocol.messages import ProtocolError, unpack_header

_I32 = struct.Struct("!i")
MAX_STARTUP_SIZE = 10_000  # what PostgreSQL itself allows for a startup packet


async def read_message(reader: asyncio.StreamReader, max_size: int) -> tuple[int, bytes]:
    """One typed message; ProtocolError when it is oversized or malformed."""
    kind, length = unpack_header(await reader.readexactly(5))
    if length > max_size:
        raise ProtocolError(f"message of {length} bytes exceeds the limit of {max_size} bytes")
    body = await reader.readexactly(length) if length else b""
    return kind, body


async def read_startup(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """An untyped startup-phase packet: its request/protocol code and the rest of its body."""
    (length,) = _I32.unpack(await reader.readexactly(4))
    if not 8 <= length <= MAX_STARTUP_SIZE:
        raise ProtocolError(f"invalid startup packet length {length}")
    body = await reader.readexactly(length - 4)
    (code,) = _I32.unpack_from(body)
    return code, body[4:]
