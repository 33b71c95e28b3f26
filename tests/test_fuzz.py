"""A hypothesis-driven fuzzer: malformed and random messages never kill the proxy or leak connections."""

from __future__ import annotations

import socket
import struct
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgleap.lab import LabServer
from pgleap.testing import ProxyThread

from conftest import start_proxy
from rawclient import login_md5

pytestmark = pytest.mark.integration

FUZZ_USER, FUZZ_PASSWORD = "fuzz", "fuzz-secret"
FRONTEND_TYPES = b"QPBEDCSHFdcfX"


def _drain(sock: socket.socket, seconds: float) -> None:
    """Read whatever comes back until the proxy closes the connection or `seconds` pass."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, OSError):
        pass


raw_messages = st.one_of(
    # Random type byte, random declared length, random body: mostly protocol violations.
    st.builds(
        lambda t, n, body: bytes([t]) + struct.pack("!I", n) + body,
        st.integers(0, 255),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=64),
    ),
    # A valid frontend type with a self-consistent length and a garbage body: the server must reject it.
    st.builds(
        lambda t, body: bytes([t]) + struct.pack("!I", len(body) + 4) + body,
        st.sampled_from(FRONTEND_TYPES),
        st.binary(max_size=200),
    ),
    # Plain random bytes.
    st.binary(min_size=1, max_size=300),
)


@pytest.fixture
def fuzz_proxy(tmp_path, pg_old: LabServer):  # type: ignore[no-untyped-def]
    """A proxy with an md5 user (cheap logins) and a small message limit, in front of PG 10."""
    p = start_proxy(
        tmp_path, {"app": pg_old}, users={FUZZ_USER: (FUZZ_PASSWORD, "md5")}, extra="max_message_size = 1048576"
    )
    yield p
    p.stop()


def _server_sessions(server: LabServer) -> int:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where datname = 'postgres' and pid <> pg_backend_pid() "
            "and backend_type = 'client backend'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_fuzzed_messages_do_not_kill_the_proxy_or_leak(fuzz_proxy: ProxyThread, pg_old: LabServer) -> None:
    """1,000 random message sequences, before and after login; afterwards the proxy serves and holds nothing."""
    baseline = _server_sessions(pg_old)
    seen = {"pre_auth": 0, "post_auth": 0}

    @settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(after_login=st.booleans(), messages=st.lists(raw_messages, min_size=1, max_size=5))
    def fuzz(after_login: bool, messages: list[bytes]) -> None:
        with socket.create_connection(("127.0.0.1", fuzz_proxy.port), timeout=10) as sock:
            if after_login:
                login_md5(sock, FUZZ_USER, FUZZ_PASSWORD)
            seen["post_auth" if after_login else "pre_auth"] += 1
            try:
                sock.sendall(b"".join(messages))
            except OSError:
                return  # the proxy already closed us: that is a valid answer to garbage
            _drain(sock, 0.05)

    fuzz()
    assert seen["pre_auth"] > 100 and seen["post_auth"] > 100, seen

    with psycopg.connect(fuzz_proxy.dsn(user=FUZZ_USER, password=FUZZ_PASSWORD)) as conn:
        assert conn.execute("select 'alive'").fetchone() == ("alive",)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        open_sessions = fuzz_proxy.call(_session_count(fuzz_proxy))
        if open_sessions == 0 and _server_sessions(pg_old) == baseline:
            break
        time.sleep(0.2)
    assert fuzz_proxy.call(_session_count(fuzz_proxy)) == 0, "the proxy still holds client sessions"
    assert _server_sessions(pg_old) == baseline, "server connections leaked"


async def _session_count(p: ProxyThread) -> int:
    assert p.proxy is not None
    return len(p.proxy.sessions)


def test_oversized_message_gets_protocol_error(fuzz_proxy: ProxyThread) -> None:
    """A message declaring more than max_message_size closes that connection with SQLSTATE 08P01."""
    with socket.create_connection(("127.0.0.1", fuzz_proxy.port), timeout=10) as sock:
        login_md5(sock, FUZZ_USER, FUZZ_PASSWORD)
        sock.sendall(b"Q" + struct.pack("!I", 50_000_000) + b"select")
        reply = b""
        sock.settimeout(10)
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply[:1] == b"E" and b"C08P01\0" in reply and b"invalid message length" in reply
    with psycopg.connect(fuzz_proxy.dsn(user=FUZZ_USER, password=FUZZ_PASSWORD)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
