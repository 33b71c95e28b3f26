"""Builders and parsers for the messages pgleap itself sends or must read."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pgleap.protocol import codes

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HEADER = struct.Struct("!cI")


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid protocol message here."""


def message(kind: int, body: bytes = b"") -> bytes:
    """Frame a typed message: type byte, int32 length (including itself), body."""
    return bytes((kind,)) + _I32.pack(len(body) + 4) + body


def cstr(value: str) -> bytes:
    """A NUL-terminated UTF-8 string."""
    return value.encode() + b"\0"


def int32(value: int) -> bytes:
    """A network-order int32."""
    return _I32.pack(value)


def auth_request(code: int, payload: bytes = b"") -> bytes:
    """An Authentication* message."""
    return message(codes.AUTHENTICATION, _I32.pack(code) + payload)


def parameter_status(name: str, value: str) -> bytes:
    """A ParameterStatus message."""
    return message(codes.PARAMETER_STATUS, cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    """A BackendKeyData message (protocol 3.0: 4-byte secret)."""
    return message(codes.BACKEND_KEY_DATA, struct.pack("!iI", pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    """A ReadyForQuery message."""
    return message(codes.READY_FOR_QUERY, status)


def command_complete(tag: str) -> bytes:
    """A CommandComplete message."""
    return message(codes.COMMAND_COMPLETE, cstr(tag))


def negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str]) -> bytes:
    """A NegotiateProtocolVersion message offering protocol 3.<newest_minor>."""
    # PostgreSQL sends the whole version number here, and libpq 18 reads it that way.
    body = (
        _I32.pack(codes.PROTOCOL_3_0 | newest_minor)
        + _I32.pack(len(unsupported))
        + b"".join(cstr(o) for o in unsupported)
    )
    return message(codes.NEGOTIATE_PROTOCOL_VERSION, body)


def error_response(
    message_text: str,
    sqlstate: str,
    severity: str = "ERROR",
    *,
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse) with the fields libpq displays."""
    fields = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate), b"M" + cstr(message_text)]
    if detail:
        fields.append(b"D" + cstr(detail))
    if hint:
        fields.append(b"H" + cstr(hint))
    kind = codes.NOTICE_RESPONSE if notice else codes.ERROR_RESPONSE
    return message(kind, b"".join(fields) + b"\0")


def row_description(columns: Sequence[str], formats: Sequence[int] = ()) -> bytes:
    """A RowDescription of text columns (type oid 25), in the result formats a Bind asked for (a text
    value's binary form is its text, so a caller sends the same DataRows either way)."""
    parts = [struct.pack("!h", len(columns))]
    for i, name in enumerate(columns):
        code = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
        parts.append(cstr(name) + struct.pack("!ihihih", 0, 0, 25, -1, -1, code))
    return message(codes.ROW_DESCRIPTION, b"".join(parts))


def data_row(values: Iterable[object]) -> bytes:
    """A DataRow in text format; None is SQL NULL."""
    cells = list(values)
    parts = [struct.pack("!h", len(cells))]
    for value in cells:
        if value is None:
            parts.append(_I32.pack(-1))
        elif isinstance(value, bool):
            parts.append(_I32.pack(1) + (b"t" if value else b"f"))
        else:
            encoded = str(value).encode()
            parts.append(_I32.pack(len(encoded)) + encoded)
    return message(codes.DATA_ROW, b"".join(parts))


def data_row_values(body: bytes) -> tuple[list[bytes | None], list[int]]:
    """A DataRow body's values (None for SQL NULL) and where each value's length word starts, then its end."""
    (count,) = _I16.unpack_from(body)
    offset = 2
    values: list[bytes | None] = []
    offsets: list[int] = []
    for _ in range(count):
        offsets.append(offset)
        (length,) = _I32.unpack_from(body, offset)
        offset += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[offset : offset + length])
            offset += length
    offsets.append(offset)
    return values, offsets


def text_row(body: bytes) -> list[str | None]:
    """The values of a text-format DataRow in UTF-8 (None for SQL NULL)."""
    return [None if v is None else v.decode() for v in data_row_values(body)[0]]


def startup_message(params: dict[str, str], protocol: int = codes.PROTOCOL_3_0) -> bytes:
    """A StartupMessage (untyped: int32 length, int32 protocol, name/value pairs)."""
    body = _I32.pack(protocol) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    """A CancelRequest packet for protocol 3.0 keys."""
    return struct.pack("!iiiI", 16, codes.CANCEL_REQUEST, pid, secret)


def parse_startup_params(body: bytes) -> dict[str, str]:
    """The name/value pairs of a StartupMessage body after the protocol number."""
    parts = body.split(b"\0")
    # A well-formed body ends with an empty name, leaving two empty strings after split.
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or (len(parts) - 2) % 2:
        raise ProtocolError("malformed startup packet: parameters are not NUL-terminated name/value pairs")
    try:
        texts = [p.decode() for p in parts[:-2]]
    except UnicodeDecodeError:
        raise ProtocolError("malformed startup packet: parameters are not valid UTF-8") from None
    return dict(zip(texts[0::2], texts[1::2], strict=True))


@dataclass(frozen=True)
class ServerError:
    """The fields of an ErrorResponse or NoticeResponse."""

    severity: str
    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.severity}: {self.message} (SQLSTATE {self.sqlstate})"
        return text + (f"; {self.detail}" if self.detail else "")


def parse_error(body: bytes) -> ServerError:
    """Decode the body of an ErrorResponse/NoticeResponse."""
    fields: dict[str, str] = {}
    for raw in body.split(b"\0"):
        if raw:
            fields[chr(raw[0])] = raw[1:].decode(errors="replace")
    return ServerError(
        severity=fields.get("V", fields.get("S", "ERROR")),
        sqlstate=fields.get("C", "XX000"),
        message=fields.get("M", ""),
        detail=fields.get("D"),
        hint=fields.get("H"),
    )


def split_cstr(body: bytes, start: int = 0) -> tuple[str, int]:
    """The NUL-terminated string at `start` and the offset after its NUL."""
    end = body.find(b"\0", start)
    if end < 0:
        raise ProtocolError("string is not NUL-terminated")
    return body[start:end].decode(errors="replace"), end + 1


def unpack_header(header: bytes) -> tuple[int, int]:
    """Type byte and body length of a 5-byte message header."""
    kind, length = _HEADER.unpack(header)
    if length < 4:
        raise ProtocolError(f"message length {length} is less than 4")
    return kind[0], length - 4
