"""Decoding the frontend messages capture needs: Parse, Bind, Execute, Describe, Close."""

from __future__ import annotations

import struct
from dataclasses import dataclass

_H = struct.Struct("!h")
_I = struct.Struct("!i")


def _cstr(body: bytes, offset: int) -> tuple[bytes, int]:
    end = body.index(b"\0", offset)
    return body[offset:end], end + 1


@dataclass(frozen=True)
class Parse:
    """A Parse message."""

    name: str
    sql: bytes
    param_types: tuple[int, ...]


@dataclass(frozen=True)
class Bind:
    """A Bind message."""

    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]


def parse_message(body: bytes) -> Parse:
    """Decode a Parse body."""
    name, offset = _cstr(body, 0)
    sql, offset = _cstr(body, offset)
    (count,) = _H.unpack_from(body, offset)
    types = struct.unpack_from(f"!{count}I", body, offset + 2) if count else ()
    return Parse(name.decode(), sql, tuple(types))


def bind_message(body: bytes) -> Bind:
    """Decode a Bind body (result formats are not needed for replay)."""
    portal, offset = _cstr(body, 0)
    statement, offset = _cstr(body, offset)
    (nformats,) = _H.unpack_from(body, offset)
    offset += 2
    formats = struct.unpack_from(f"!{nformats}h", body, offset) if nformats else ()
    offset += 2 * nformats
    (nparams,) = _H.unpack_from(body, offset)
    offset += 2
    params: list[bytes | None] = []
    for _ in range(nparams):
        (length,) = _I.unpack_from(body, offset)
        offset += 4
        if length < 0:
            params.append(None)
        else:
            params.append(body[offset : offset + length])
            offset += length
    return Bind(portal.decode(), statement.decode(), tuple(formats), tuple(params))


def name_of(body: bytes) -> tuple[str, str]:
    """The ('S' or 'P', name) of a Describe or Close body."""
    return chr(body[0]), _cstr(body, 1)[0].decode()


def execute_portal(body: bytes) -> str:
    """The portal an Execute runs."""
    return _cstr(body, 0)[0].decode()
