"""The server side of SCRAM-SHA-256 as PostgreSQL clients speak it (RFC 5802/7677).

scramp derives the keys and runs pgleap's client side, but its server refuses the empty
username that libpq and every PostgreSQL driver send (the startup packet names the user),
so the server-side exchange is done here with scramp's key material.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field


class ScramFailure(Exception):
    """The client's SCRAM messages are malformed or its proof is wrong."""


def _attributes(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramFailure(f"malformed SCRAM attribute {part!r}")
        out[part[0]] = part[2:]
    return out


@dataclass
class ScramServerExchange:
    """One SCRAM-SHA-256 exchange against stored keys (no channel binding)."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int
    server_nonce: str = field(default_factory=lambda: base64.b64encode(secrets.token_bytes(18)).decode())
    _client_first_bare: str = ""
    _server_first: str = ""
    _nonce: str = ""
    _auth_message: bytes = b""

    def server_first(self, client_first: str) -> str:
        """Answer the client-first message."""
        gs2, _, rest = client_first.partition(",")
        authzid, _, bare = rest.partition(",")
        if gs2 not in ("n", "y") or authzid:
            raise ScramFailure("unsupported SCRAM GS2 header (channel binding and authzid are not offered)")
        attrs = _attributes(bare)
        if not attrs.get("r"):
            raise ScramFailure("client-first message has no nonce")
        self._client_first_bare = bare
        self._nonce = attrs["r"] + self.server_nonce
        salt = base64.b64encode(self.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self.iterations}"
        return self._server_first

    def server_final(self, client_final: str) -> str:
        """Check the client's proof; return the server-final message."""
        without_proof, sep, proof_part = client_final.rpartition(",p=")
        if not sep:
            raise ScramFailure("client-final message has no proof")
        attrs = _attributes(without_proof)
        if attrs.get("r") != self._nonce:
            raise ScramFailure("client-final nonce does not match")
        if attrs.get("c") not in ("biws", "eSws"):  # base64 of "n,," and "y,,"
            raise ScramFailure("unexpected channel-binding data")
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError:
            raise ScramFailure("client proof is not base64") from None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.digest(self.stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise ScramFailure("client proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key):
            raise ScramFailure("wrong password")
        server_signature = hmac.digest(self.server_key, auth_message, "sha256")
        return "v=" + base64.b64encode(server_signature).decode()
