"""A frontend-protocol client over a bare socket, for tests that decide exactly how bytes reach the proxy."""

from __future__ import annotations

import socket
import struct

from pgleap.protocol.auth import md5_response


def startup_message(user: str, database: str) -> bytes:
    """A protocol 3.0 StartupMessage."""
    body = struct.pack("!i", 196608) + f"user\0{user}\0database\0{database}\0\0".encode()
    return struct.pack("!i", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    """A simple-protocol Query."""
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes (ConnectionError if the peer closes first)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_until_ready(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """Every message up to and including the next ReadyForQuery, as (type, body)."""
    messages = []
    while True:
        kind, length = struct.unpack("!cI", recv_exact(sock, 5))
        messages.append((kind, recv_exact(sock, length - 4)))
        if kind == b"Z":
            return messages


def login_md5(sock: socket.socket, user: str, password: str, database: str = "app") -> None:
    """Start up, answer the md5 challenge, and read up to the first ReadyForQuery."""
    sock.sendall(startup_message(user, database))
    header = recv_exact(sock, 9)
    assert header[:1] == b"R" and struct.unpack("!i", header[5:9])[0] == 5, header
    salt = recv_exact(sock, 4)
    answer = md5_response(user, password, salt).encode() + b"\0"
    sock.sendall(b"p" + struct.pack("!I", len(answer) + 4) + answer)
    kinds = {kind for kind, _ in read_until_ready(sock)}
    assert kinds <= {b"R", b"S", b"K", b"N", b"Z"}, kinds
