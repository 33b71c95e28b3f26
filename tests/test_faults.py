"""Failures around the proxy: bad logins, vanished clients, killed backends, cancels, pauses."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.testing import ProxyThread

from conftest import tool

pytestmark = pytest.mark.integration


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def backend_pids(server: LabServer, application_name: str) -> list[int]:
    """Server pids of sessions with this application_name, read directly from the server."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "select pid from pg_stat_activity where application_name = %s", (application_name,)
        ).fetchall()
    return [r[0] for r in rows]


def test_wrong_password_is_refused_and_others_continue(proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "app"'):
        psycopg.connect(proxy.dsn(password="wrong"))
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "nobody"'):
        psycopg.connect(proxy.dsn(user="nobody", password="x"))
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_unknown_database(proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError, match='database "nope" does not exist'):
        psycopg.connect(proxy.dsn(database="nope"))


def test_client_disconnect_mid_query_frees_its_backend(proxy: ProxyThread, backend: LabServer) -> None:
    psql = subprocess.Popen(
        [tool("psql"), proxy.dsn(application_name="vanishing_client"), "-X", "-c", "select pg_sleep(120)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: len(backend_pids(backend, "vanishing_client")) == 1, what="the client's query to start")
    finally:
        psql.kill()
        psql.wait()
    # pgleap cancels the abandoned query and closes the server connection; without that, pg_sleep runs on.
    wait_until(lambda: not backend_pids(backend, "vanishing_client"), what="the abandoned backend to go away")
    assert proxy.call(_count_sessions(proxy)) == 0


async def _count_sessions(proxy: ProxyThread) -> int:
    assert proxy.proxy is not None
    return len(proxy.proxy.sessions)


def test_backend_killed_mid_query(proxy: ProxyThread, backend: LabServer) -> None:
    victim = psycopg.connect(proxy.dsn(application_name="victim"), autocommit=True)
    bystander = psycopg.connect(proxy.dsn(application_name="bystander"), autocommit=True)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(lambda: victim.execute("select pg_sleep(120)"))
            wait_until(lambda: len(backend_pids(backend, "victim")) == 1, what="the victim's query to start")
            with psycopg.connect(backend.dsn(), autocommit=True) as admin:
                admin.execute("select pg_terminate_backend(%s)", (backend_pids(backend, "victim")[0],))
            with pytest.raises(psycopg.OperationalError, match="terminating connection"):
                running.result(timeout=30)
        assert bystander.execute("select 42").fetchone() == (42,)
        with psycopg.connect(proxy.dsn()) as fresh:
            assert fresh.execute("select 1").fetchone() == (1,)
    finally:
        victim.close()
        bystander.close()


def test_cancel_reaches_the_right_backend(proxy: ProxyThread, backend: LabServer) -> None:
    first = psycopg.connect(proxy.dsn(application_name="cancel_me"), autocommit=True)
    second = psycopg.connect(proxy.dsn(application_name="keep_me"), autocommit=True)
    try:
        with ThreadPoolExecutor(2) as pool:
            cancelled = pool.submit(lambda: first.execute("select pg_sleep(60)"))
            kept = pool.submit(lambda: second.execute("select pg_sleep(3), 'kept'").fetchone())
            wait_until(
                lambda: len(backend_pids(backend, "cancel_me")) == 1 and len(backend_pids(backend, "keep_me")) == 1,
                what="both queries to start",
            )
            time.sleep(0.3)
            started = time.monotonic()
            # cancel_safe waits without holding the GIL, which the in-process proxy thread needs.
            first.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                cancelled.result(timeout=30)
            assert time.monotonic() - started < 20
            assert kept.result(timeout=60)[1] == "kept"
        assert first.execute("select 'still usable'").fetchone() == ("still usable",)
    finally:
        first.close()
        second.close()


def test_copy_in_and_out_100mb(proxy: ProxyThread) -> None:
    line = ("x" * 1000) + "\n"
    rows = 100 * 1024  # 100,000+ rows of ~1 kB: 100 MB each way
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("drop table if exists copy_big")
        conn.execute("create table copy_big(id bigserial, payload text)")
        chunk = line * 256
        with conn.cursor().copy("copy copy_big(payload) from stdin") as copy:
            for _ in range(rows // 256):
                copy.write(chunk)
        conn.commit()
        count, total = conn.execute("select count(*), sum(length(payload)) from copy_big").fetchone()  # type: ignore[misc]
        assert (count, total) == (rows, rows * 1000)
        received = 0
        lines = 0
        with conn.cursor().copy("copy copy_big(payload) to stdout") as copy:
            for data in copy:
                received += len(data)
                lines += bytes(data).count(b"\n")
        assert (lines, received) == (rows, rows * len(line))
        conn.execute("drop table copy_big")
        conn.commit()


def test_listen_notify(proxy: ProxyThread) -> None:
    listener = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        listener.execute("listen pgleap_channel")
        with psycopg.connect(proxy.dsn(), autocommit=True) as notifier:
            notifier.execute("select pg_notify('pgleap_channel', 'hello through pgleap')")
        received = []
        for notify in listener.notifies(timeout=15, stop_after=1):
            received.append((notify.channel, notify.payload))
        assert received == [("pgleap_channel", "hello through pgleap")]
    finally:
        listener.close()


def test_transaction_spanning_pause(proxy: ProxyThread, backend: LabServer) -> None:
    assert proxy.proxy is not None
    with psycopg.connect(proxy.dsn(), autocommit=True) as setup:
        setup.execute("drop table if exists pause_t; create table pause_t(v text)")
    in_tx = psycopg.connect(proxy.dsn())
    newcomer = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        in_tx.execute("insert into pause_t values ('before pause')")
        pause_done = threading.Event()

        async def pause() -> int:
            assert proxy.proxy is not None
            still = await proxy.proxy.pause()
            pause_done.set()
            return still

        pause_future = __import__("asyncio").run_coroutine_threadsafe(pause(), proxy.loop)
        wait_until(lambda: proxy.proxy.gate.paused, what="PAUSE to begin")  # type: ignore[union-attr]
        assert not pause_done.is_set(), "PAUSE must wait for the running transaction"
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(
                lambda: newcomer.execute("insert into pause_t values ('after resume') returning v").fetchone()
            )
            # The running transaction keeps going and commits while paused.
            in_tx.execute("insert into pause_t values ('during pause')")
            in_tx.commit()
            assert pause_future.result(timeout=30) == 0
            time.sleep(0.5)
            assert not held.done(), "a new transaction must wait while paused"
            proxy.loop.call_soon_threadsafe(proxy.proxy.resume)
            assert held.result(timeout=30) == ("after resume",)
        with psycopg.connect(backend.dsn()) as direct:
            values = [r[0] for r in direct.execute("select v from pause_t order by v").fetchall()]
        assert values == ["after resume", "before pause", "during pause"]
    finally:
        proxy.loop.call_soon_threadsafe(proxy.proxy.resume)
        in_tx.close()
        newcomer.close()


def test_pause_after_simple_copy_does_not_wait_on_an_idle_session(proxy: ProxyThread) -> None:
    """After COPY FROM STDIN the session is idle again: PAUSE must not count it as mid-transaction."""
    assert proxy.proxy is not None
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("drop table if exists copy_idle; create table copy_idle (v text)")
        with conn.cursor().copy("copy copy_idle from stdin") as copy:
            copy.write_row(("a",))
        try:
            assert proxy.call(proxy.proxy.pause(timeout=10)) == 0, "an idle session was counted as busy"
        finally:
            proxy.loop.call_soon_threadsafe(proxy.proxy.resume)
        assert conn.execute("select count(*) from copy_idle").fetchone() == (1,)
