"""Authentication: of clients by pgleap (SCRAM-SHA-256, md5) and of pgleap to servers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from functools import lru_cache

from scramp import ScramClient, ScramException, ScramMechanism

from pgleap.errors import AuthenticationError, ServerUnavailableError
from pgleap.protocol import codes
from pgleap.protocol.messages import (
    ProtocolError,
    auth_request,
    cstr,
    message,
    parse_error,
)
from pgleap.protocol.scram import ScramFailure, ScramServerExchange
from pgleap.protocol.stream import read_message

_SCRAM = ScramMechanism("SCRAM-SHA-256")
_MAX_AUTH_MESSAGE = 64 * 1024


@dataclass(frozen=True)
class Credential:
    """What pgleap knows about one client user's secret."""

    method: str  # "scram-sha-256" or "md5"
    password: str | None = None
    scram_verifier: str | None = None
    md5_hash: str | None = None  # "md5" + md5(password + username)


def md5_password_hash(user: str, password: str) -> str:
    """The form PostgreSQL stores md5 passwords in: 'md5' + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(user: str, password: str, salt: bytes) -> str:
    """The md5 password message a client sends for this salt."""
    inner = md5_password_hash(user, password)[3:]
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


@lru_cache(maxsize=1024)
def _scram_info_from_password(password: str) -> tuple[bytes, bytes, bytes, int]:
    # Deriving keys costs 4096 PBKDF2 rounds: do it once per password, not per login.
    return _SCRAM.make_auth_info(password, iteration_count=4096)  # type: ignore[no-any-return]


def parse_scram_verifier(verifier: str) -> tuple[bytes, bytes, bytes, int]:
    """Split 'SCRAM-SHA-256$iter:salt$StoredKey:ServerKey' (pg_authid form) into scramp's auth info."""
    try:
        _, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt = iter_salt.split(":", 1)
        stored_key, server_key = keys.split(":", 1)
        return (
            base64.b64decode(salt),
            base64.b64decode(stored_key),
            base64.b64decode(server_key),
            int(iterations),
        )
    except (ValueError, TypeError) as exc:
        raise AuthenticationError(f"malformed SCRAM verifier: {exc}") from exc


def _scram_info(credential: Credential | None) -> tuple[bytes, bytes, bytes, int]:
    if credential is None:
        # Unknown user: run a full exchange with throwaway keys so the failure looks the same.
        return _scram_info_from_password(secrets.token_hex(16))
    if credential.scram_verifier:
        return parse_scram_verifier(credential.scram_verifier)
    assert credential.password is not None
    return _scram_info_from_password(credential.password)


def _password_failed(user: str) -> AuthenticationError:
    return AuthenticationError(f'password authentication failed for user "{user}"')


async def authenticate_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    user: str,
    credential: Credential | None,
) -> None:
    """Run pgleap's side of a client login; AuthenticationError when the client fails it."""
    method = credential.method if credential else "scram-sha-256"
    if method == "md5":
        await _md5_exchange(reader, writer, user, credential)
    else:
        await _scram_exchange(reader, writer, user, credential)
    writer.write(auth_request(codes.AUTH_OK))


async def _read_password_message(reader: asyncio.StreamReader) -> bytes:
    kind, body = await read_message(reader, _MAX_AUTH_MESSAGE)
    if kind != codes.PASSWORD:
        raise ProtocolError(f"expected a password message, got message type {chr(kind)!r}")
    return body


async def _md5_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str, credential: Credential | None
) -> None:
    salt = secrets.token_bytes(4)
    writer.write(auth_request(codes.AUTH_MD5, salt))
    await writer.drain()
    answer = (await _read_password_message(reader)).rstrip(b"\0").decode(errors="replace")
    if credential is None:
        raise _password_failed(user)
    stored = credential.md5_hash or md5_password_hash(user, credential.password or "")
    expected = "md5" + hashlib.md5(stored[3:].encode() + salt).hexdigest()
    if not hmac.compare_digest(answer, expected):
        raise _password_failed(user)


async def _scram_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str, credential: Credential | None
) -> None:
    exchange = ScramServerExchange(*_scram_info(credential))
    writer.write(auth_request(codes.AUTH_SASL, cstr("SCRAM-SHA-256") + b"\0"))
    await writer.drain()
    body = await _read_password_message(reader)
    try:
        end = body.index(b"\0")
        mechanism = body[:end].decode()
        (length,) = struct.unpack_from("!i", body, end + 1)
        client_first = body[end + 5 : end + 5 + length].decode()
    except (ValueError, struct.error, UnicodeDecodeError):
        raise ProtocolError("malformed SASLInitialResponse") from None
    if mechanism != "SCRAM-SHA-256":
        raise AuthenticationError(
            f"client selected unsupported SASL mechanism {mechanism!r}; pgleap offers SCRAM-SHA-256"
        )
    try:
        server_first = exchange.server_first(client_first)
    except ScramFailure as exc:
        raise ProtocolError(f"invalid SCRAM client-first message: {exc}") from None
    writer.write(auth_request(codes.AUTH_SASL_CONTINUE, server_first.encode()))
    await writer.drain()
    try:
        server_final = exchange.server_final((await _read_password_message(reader)).decode())
    except (ScramFailure, UnicodeDecodeError):
        raise _password_failed(user) from None
    if credential is None:
        raise _password_failed(user)
    writer.write(auth_request(codes.AUTH_SASL_FINAL, server_final.encode()))


# Refusals before the login that say "not now" (insufficient resources, connection exceptions), and
# cannot_connect_now, admin_shutdown, crash_shutdown: a retry may succeed, the credentials are not at fault.
_NOT_NOW_CLASSES = frozenset(["53", "08"])
_NOT_NOW = frozenset(["57P03", "57P01", "57P02"])


async def authenticate_to_server(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    user: str,
    password: str | None,
    server_name: str,
) -> None:
    """Answer a server's authentication requests until AuthenticationOk (trust, password, md5, SCRAM)."""
    scram: ScramClient | None = None
    while True:
        kind, body = await read_message(reader, _MAX_AUTH_MESSAGE)
        if kind == codes.ERROR_RESPONSE:
            error = parse_error(body)
            if error.sqlstate[:2] in _NOT_NOW_CLASSES or error.sqlstate in _NOT_NOW:
                # Starting up, shutting down, in recovery, out of connection slots: nothing wrong with the login.
                raise ServerUnavailableError(
                    f"{server_name} is not accepting connections now: {error.message} (SQLSTATE {error.sqlstate})"
                )
            raise AuthenticationError(
                f"{server_name} refused pgleap's login as {user!r}: {error.message} (SQLSTATE {error.sqlstate})"
            )
        if kind != codes.AUTHENTICATION:
            raise ProtocolError(f"{server_name} sent message type {chr(kind)!r} during authentication")
        (code,) = struct.unpack_from("!i", body)
        if code == codes.AUTH_OK:
            return
        if code in (codes.AUTH_CLEARTEXT, codes.AUTH_MD5, codes.AUTH_SASL) and password is None:
            raise AuthenticationError(
                f"{server_name} asks for a password for {user!r} but the config has none; set its *_password"
            )
        assert password is not None or code in (codes.AUTH_SASL_CONTINUE, codes.AUTH_SASL_FINAL)
        if code == codes.AUTH_CLEARTEXT:
            writer.write(message(codes.PASSWORD, cstr(password or "")))
        elif code == codes.AUTH_MD5:
            writer.write(message(codes.PASSWORD, cstr(md5_response(user, password or "", body[4:8]))))
        elif code == codes.AUTH_SASL:
            mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
            if "SCRAM-SHA-256" not in mechanisms:
                raise AuthenticationError(f"{server_name} offers only {mechanisms}; pgleap supports SCRAM-SHA-256")
            scram = ScramClient(["SCRAM-SHA-256"], user, password or "")
            first = scram.get_client_first().encode()
            writer.write(message(codes.PASSWORD, cstr("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first))
        elif code == codes.AUTH_SASL_CONTINUE and scram is not None:
            scram.set_server_first(body[4:].decode())
            writer.write(message(codes.PASSWORD, scram.get_client_final().encode()))
        elif code == codes.AUTH_SASL_FINAL and scram is not None:
            try:
                scram.set_server_final(body[4:].decode())
            except ScramException as exc:
                raise AuthenticationError(f"{server_name} failed SCRAM server verification: {exc}") from exc
        else:
            raise AuthenticationError(
                f"{server_name} asks for authentication method {code}, which pgleap does not support "
                "(supported: trust, password, md5, SCRAM-SHA-256)"
            )
        await writer.drain()
