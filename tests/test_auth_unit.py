"""pgleap's SCRAM server exchange and md5 helpers against scramp's client and real PostgreSQL secrets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import struct

import pytest
from scramp import ScramClient, ScramException, ScramMechanism

from pgleap.errors import AuthenticationError
from pgleap.lab import LabServer
from pgleap.protocol.auth import (
    Credential,
    authenticate_client,
    md5_password_hash,
    md5_response,
    parse_scram_verifier,
)
from pgleap.protocol.scram import ScramFailure, ScramServerExchange

PASSWORD = "correct horse battery staple"


def keys_for(password: str, iterations: int = 4096) -> tuple[bytes, bytes, bytes, int]:
    """(salt, StoredKey, ServerKey, iterations) as scramp derives them."""
    return ScramMechanism("SCRAM-SHA-256").make_auth_info(password, iteration_count=iterations)  # type: ignore[no-any-return]


def verifier_text(salt: bytes, stored: bytes, server: bytes, iterations: int) -> str:
    """The pg_authid.rolpassword form of these keys."""
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


class LibpqScramClient:
    """The client side of SCRAM-SHA-256 as libpq speaks it: empty user name (scramp's client refuses one).

    Same method names as scramp.ScramClient; checked against scramp's server below.
    """

    def __init__(self, username: str, password: str) -> None:
        self.password = password
        self.first_bare = f"n={username},r={base64.b64encode(secrets.token_bytes(18)).decode()}"
        self.server_first = ""
        self.expected_final = ""

    def get_client_first(self) -> str:
        return "n,," + self.first_bare

    def set_server_first(self, message: str) -> None:
        self.server_first = message

    def get_client_final(self) -> str:
        attrs = dict(part.split("=", 1) for part in self.server_first.split(","))
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        without_proof = f"c=biws,r={attrs['r']}"
        auth = f"{self.first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.expected_final = "v=" + base64.b64encode(hmac.digest(server_key, auth, "sha256")).decode()
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def set_server_final(self, message: str) -> None:
        if message != self.expected_final:
            raise ScramException("server signature does not match")


def scram_client(username: str, password: str) -> ScramClient | LibpqScramClient:
    """scramp's client, or the libpq-style one for the empty user name."""
    return ScramClient(["SCRAM-SHA-256"], username, password) if username else LibpqScramClient(username, password)


def test_libpq_style_client_agrees_with_scramp_server() -> None:
    """The helper client above completes an exchange with scramp's own server (so it is a fair test client)."""
    keys = keys_for(PASSWORD)
    server = ScramMechanism("SCRAM-SHA-256").make_server(lambda _user: keys)
    client = LibpqScramClient("app", PASSWORD)
    server.set_client_first(client.get_client_first())
    client.set_server_first(server.get_server_first())
    server.set_client_final(client.get_client_final())
    client.set_server_final(server.get_server_final())


def exchange(
    keys: tuple[bytes, bytes, bytes, int], username: str, password: str
) -> tuple[ScramClient | LibpqScramClient, str]:
    """Run a full exchange against pgleap's server side; returns the client and the server-final message."""
    server = ScramServerExchange(*keys)
    client = scram_client(username, password)
    client.set_server_first(server.server_first(client.get_client_first()))
    final = server.server_final(client.get_client_final())
    return client, final


@pytest.mark.parametrize("username", ["app", ""], ids=["named", "empty-like-libpq"])
def test_scram_correct_password(username: str) -> None:
    """The right password passes, and scramp's client verifies pgleap's server signature."""
    client, final = exchange(keys_for(PASSWORD), username, PASSWORD)
    assert final.startswith("v=")
    client.set_server_final(final)  # raises ScramException if the server signature is wrong


def test_scram_wrong_password() -> None:
    """A wrong password fails the proof check."""
    with pytest.raises(ScramFailure, match="wrong password"):
        exchange(keys_for(PASSWORD), "", PASSWORD + "x")


def test_scram_client_rejects_server_without_keys() -> None:
    """A server holding a different ServerKey is caught by the client (mutual authentication is real)."""
    salt, stored, _, iterations = keys_for(PASSWORD)
    server = ScramServerExchange(salt, stored, hashlib.sha256(b"not the server key").digest(), iterations)
    client = scram_client("", PASSWORD)
    client.set_server_first(server.server_first(client.get_client_first()))
    final = server.server_final(client.get_client_final())  # the proof is fine: StoredKey matches
    with pytest.raises(ScramException):
        client.set_server_final(final)


def test_scram_tampered_nonce() -> None:
    """A client-final whose nonce differs from the combined nonce is refused."""
    server = ScramServerExchange(*keys_for(PASSWORD))
    client = scram_client("", PASSWORD)
    server_first = server.server_first(client.get_client_first())
    client.set_server_first(server_first)
    final = client.get_client_final()
    nonce = server_first.split(",")[0][2:]
    tampered = final.replace(f"r={nonce}", f"r={nonce[:-1]}{'A' if nonce[-1] != 'A' else 'B'}")
    assert tampered != final
    with pytest.raises(ScramFailure, match="nonce"):
        server.server_final(tampered)


def test_scram_server_nonce_extends_client_nonce() -> None:
    """server-first carries the client nonce plus a fresh server part, the salt and the iteration count."""
    salt, stored, key, iterations = keys_for(PASSWORD)
    first_a = ScramServerExchange(salt, stored, key, iterations).server_first("n,,n=,r=clientnonce")
    first_b = ScramServerExchange(salt, stored, key, iterations).server_first("n,,n=,r=clientnonce")
    attrs = dict(part.split("=", 1) for part in first_a.split(","))
    assert attrs["r"].startswith("clientnonce") and len(attrs["r"]) > len("clientnonce") + 16
    assert base64.b64decode(attrs["s"]) == salt and attrs["i"] == str(iterations)
    assert first_a != first_b, "server nonce must be random per exchange"


@pytest.mark.parametrize(
    "final",
    ["c=biws,r=x", "c=biws,r=x,p=!!!", "garbage", "c=eHl6,r=NONCE,p=AAAA"],
    ids=["no-proof", "proof-not-base64", "not-attributes", "bad-channel-binding"],
)
def test_scram_malformed_client_final(final: str) -> None:
    """Malformed client-final messages fail with ScramFailure, never another exception."""
    server = ScramServerExchange(*keys_for(PASSWORD))
    first = server.server_first("n,,n=,r=abc")
    nonce = first.split(",")[0][2:]
    with pytest.raises(ScramFailure):
        server.server_final(final.replace("NONCE", nonce).replace("r=x", f"r={nonce}"))


@pytest.mark.parametrize(
    "client_first", ["p=tls-server-end-point,,n=,r=abc", "n,a=someone,n=,r=abc", "n,,n=", "n,,garbage"]
)
def test_scram_unsupported_client_first(client_first: str) -> None:
    """Channel binding, authzid, a missing nonce or garbage in client-first are refused."""
    with pytest.raises(ScramFailure):
        ScramServerExchange(*keys_for(PASSWORD)).server_first(client_first)


def test_parse_scram_verifier_roundtrip() -> None:
    """parse_scram_verifier reads the pg_authid form back into scramp's key material."""
    keys = keys_for(PASSWORD, iterations=5000)
    assert parse_scram_verifier(verifier_text(*keys)) == keys


@pytest.mark.parametrize("bad", ["SCRAM-SHA-256", "SCRAM-SHA-256$4096:c2FsdA==", "SCRAM-SHA-256$x:c2FsdA==$YQ==:Yg=="])
def test_parse_scram_verifier_malformed(bad: str) -> None:
    """Malformed verifiers raise AuthenticationError."""
    with pytest.raises(AuthenticationError, match="malformed SCRAM verifier"):
        parse_scram_verifier(bad)


@pytest.mark.integration
def test_real_postgres_scram_verifier(pg_new: LabServer) -> None:
    """A verifier taken from PG 18's pg_authid parses, matches scramp's derivation and authenticates its password."""
    rolpassword = pg_new.psql("select rolpassword from pg_authid where rolname = current_user")
    assert rolpassword.startswith("SCRAM-SHA-256$"), rolpassword
    salt, stored, server, iterations = parse_scram_verifier(rolpassword)
    assert iterations >= 4096 and len(stored) == len(server) == 32
    expected = ScramMechanism("SCRAM-SHA-256").make_auth_info(pg_new.password, salt=salt, iteration_count=iterations)
    assert (salt, stored, server, iterations) == tuple(expected)
    client, final = exchange((salt, stored, server, iterations), "", pg_new.password)
    client.set_server_final(final)
    with pytest.raises(ScramFailure):
        exchange((salt, stored, server, iterations), "", "wrong-" + pg_new.password)


@pytest.mark.integration
def test_md5_hash_matches_postgres(pg_old: LabServer) -> None:
    """md5_password_hash produces exactly what PG 10 stores in pg_authid for an md5 password."""
    rolpassword = pg_old.psql("select rolpassword from pg_authid where rolname = current_user")
    assert rolpassword.startswith("md5"), rolpassword
    assert md5_password_hash(pg_old.superuser, pg_old.password) == rolpassword


def test_md5_helpers_known_values() -> None:
    """md5 hash and salted response follow PostgreSQL's formula: md5(md5(password || user) || salt)."""
    inner = hashlib.md5(b"secretalice").hexdigest()
    assert md5_password_hash("alice", "secret") == "md5" + inner
    salt = b"\x01\x02\x03\x04"
    assert md5_response("alice", "secret", salt) == "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert len(md5_response("alice", "secret", salt)) == 35


# -- authenticate_client over a real socket -------------------------------------------------------


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


async def _read(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind = await reader.readexactly(1)
    (length,) = struct.unpack("!i", await reader.readexactly(4))
    return kind, await reader.readexactly(length - 4)


async def _login(credential: Credential | None, password: str, method: str) -> tuple[str, list[int]]:
    """Run authenticate_client behind a loopback socket and log in like libpq (empty SCRAM user name).

    Returns pgleap's error ("" on success) and the authentication codes the client received after its answers.
    """
    outcome: dict[str, str] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await authenticate_client(reader, writer, "app", credential)
            outcome["error"] = ""
        except AuthenticationError as exc:
            outcome["error"] = str(exc)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        kind, body = await _read(reader)
        (code,) = struct.unpack_from("!i", body)
        client = None
        if method == "md5":
            assert (kind, code) == (b"R", 5)
            writer.write(_message(b"p", md5_response("app", password, body[4:8]).encode() + b"\0"))
        else:
            assert (kind, code) == (b"R", 10) and b"SCRAM-SHA-256" in body
            client = scram_client("", password)
            first = client.get_client_first().encode()
            writer.write(_message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
            kind, body = await _read(reader)
            assert (kind, struct.unpack_from("!i", body)[0]) == (b"R", 11)
            client.set_server_first(body[4:].decode())
            writer.write(_message(b"p", client.get_client_final().encode()))
        received: list[int] = []
        while True:  # pgleap closes the socket after the exchange in this harness
            try:
                kind, body = await asyncio.wait_for(_read(reader), 30)
            except asyncio.IncompleteReadError:
                break
            assert kind == b"R"
            received.append(struct.unpack_from("!i", body)[0])
            if received[-1] == 12 and client is not None:
                client.set_server_final(body[4:].decode())  # the client verifies pgleap
        writer.close()
    finally:
        server.close()
    return outcome["error"], received


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_authenticate_client_accepts_right_password(method: str) -> None:
    """authenticate_client completes a real md5 or SCRAM login and sends AuthenticationOk."""
    error, received = asyncio.run(_login(Credential(method, password=PASSWORD), PASSWORD, method))
    assert error == ""
    assert received == ([0] if method == "md5" else [12, 0])


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_authenticate_client_rejects_wrong_password(method: str) -> None:
    """A wrong password fails with PostgreSQL's message naming the user, and no AuthenticationOk is sent."""
    error, received = asyncio.run(_login(Credential(method, password=PASSWORD), "nope", method))
    assert error == 'password authentication failed for user "app"'
    assert received == []


def test_authenticate_client_with_stored_verifier_and_md5_hash() -> None:
    """Users configured only by a SCRAM verifier or an md5 hash can log in with their password."""
    verifier = verifier_text(*keys_for(PASSWORD))
    assert asyncio.run(_login(Credential("scram-sha-256", scram_verifier=verifier), PASSWORD, "scram")) == ("", [12, 0])
    md5_hash = md5_password_hash("app", PASSWORD)
    assert asyncio.run(_login(Credential("md5", md5_hash=md5_hash), PASSWORD, "md5")) == ("", [0])


def test_authenticate_client_unknown_user_fails() -> None:
    """An unknown user (no credential) fails like a wrong password, after a full SCRAM exchange."""
    error, received = asyncio.run(_login(None, "anything", "scram-sha-256"))
    assert error == 'password authentication failed for user "app"'
    assert received == []


@pytest.mark.parametrize(
    ("sqlstate", "refused_login"),
    [("57P03", False), ("53300", False), ("57P01", False), ("28P01", True), ("28000", True)],
)
def test_a_server_that_cannot_take_connections_now_is_unavailable_not_a_refused_login(
    sqlstate: str, refused_login: bool
) -> None:
    """A server starting up, shutting down or full says so before the login: worth a retry (replay reconnects)."""
    from pgleap.errors import ServerUnavailableError
    from pgleap.protocol.auth import authenticate_to_server
    from pgleap.protocol.messages import error_response

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(error_response("the database system is starting up", sqlstate, "FATAL"))
        reader.feed_eof()
        expected = AuthenticationError if refused_login else ServerUnavailableError
        with pytest.raises(expected, match=sqlstate):
            await authenticate_to_server(reader, None, "pgleap", "secret", "server 127.0.0.1:5432")  # type: ignore[arg-type]

    asyncio.run(run())
