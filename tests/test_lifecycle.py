"""`pgleap run` as a real process: graceful SIGTERM, the shutdown timeout, bad configs, admin SHUTDOWN."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.lab.ports import free_port
from pgleap.testing import ProxyProcess, accepts, render_config

pytestmark = pytest.mark.integration

PGLEAP = Path(sys.executable).with_name("pgleap")


@pytest.fixture
def table(pg_new: LabServer) -> Iterator[str]:
    """A fresh table on pg_new, dropped afterwards."""
    name = f"t_life_{uuid.uuid4().hex[:8]}"
    pg_new.psql(f"create table {name}(id int primary key)")
    yield name
    pg_new.psql(f"drop table if exists {name}")


def count_rows(server: LabServer, table: str) -> int:
    return int(server.psql(f"select count(*) from {table}"))


def test_sigterm_lets_running_transaction_commit(tmp_path: Path, pg_new: LabServer, table: str) -> None:
    """After SIGTERM new logins fail, a running transaction still commits durably, and pgleap exits 0."""
    pg = ProxyProcess(tmp_path, {"app": pg_new}, extra='shutdown_timeout = "60s"')
    try:
        pg.wait_accepting()
        with psycopg.connect(pg.dsn(), autocommit=False) as conn:
            conn.execute(f"insert into {table} values (1)")
            pg.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while True:  # new connections stop being served once shutdown has begun
                try:
                    with psycopg.connect(pg.dsn()) as late:
                        late.execute("select 1")
                except psycopg.OperationalError:
                    break
                assert time.monotonic() < deadline, "new connections still served 30s after SIGTERM"
                time.sleep(0.05)
            assert pg.proc.poll() is None, "pgleap exited while a transaction was running"
            conn.execute(f"insert into {table} values (2)")
            assert conn.execute(f"select count(*) from {table}").fetchone() == (2,)
            committed_at = time.monotonic()
            conn.commit()
        assert pg.wait_exit(30) == 0, pg.output()
        assert time.monotonic() - committed_at < 30
        assert count_rows(pg_new, table) == 2
    finally:
        pg.stop()


def test_sigterm_timeout_ends_endless_transaction(tmp_path: Path, pg_new: LabServer, table: str) -> None:
    """With shutdown_timeout 2s an open transaction is cut: FATAL 57P01 to the client, exit 0, nothing committed."""
    pg = ProxyProcess(tmp_path, {"app": pg_new}, extra='shutdown_timeout = "2s"')
    try:
        pg.wait_accepting()
        with psycopg.connect(pg.dsn(), autocommit=False) as conn:
            conn.execute(f"insert into {table} values (1)")
            signalled = time.monotonic()
            pg.proc.send_signal(signal.SIGTERM)
            assert pg.wait_exit(30) == 0, pg.output()
            assert time.monotonic() - signalled >= 1.5, "pgleap did not wait for the shutdown timeout"
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select 1")
            assert info.value.sqlstate == "57P01", f"expected admin_shutdown, got {info.value.sqlstate}: {info.value}"
            assert "shutting down" in str(info.value)
        deadline = time.monotonic() + 30  # the server rolls the cut transaction back
        while (
            pg_new.psql(
                f"select count(*) from pg_stat_activity where query like '%insert into {table}%' and pid <> pg_backend_pid()"
            )
            != "0"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert count_rows(pg_new, table) == 0
    finally:
        pg.stop()


BAD_CONFIGS = {
    # name: (change to a valid config, text the error message must contain)
    "unknown-key": (lambda text: text.replace("[pgleap]\n", "[pgleap]\nlisten_prot = 7000\n"), "listen_prot"),
    "missing-source-host": (lambda text: text.replace("source_host = ", "source_hots = "), "source_host"),
    "bad-port": (lambda text: re.sub(r"listen_port = \d+", "listen_port = 70000", text), "pgleap.listen_port"),
    "bad-duration": (
        lambda text: text.replace("[pgleap]\n", '[pgleap]\nshutdown_timeout = "soon"\n'),
        "pgleap.shutdown_timeout",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, pg_old: LabServer, case: str) -> None:
    """`pgleap run` with an invalid config exits with code 2 and a message naming the key."""
    mutate, expected = BAD_CONFIGS[case]
    valid = render_config({"app": pg_old}).replace("listen_port = 0", f"listen_port = {free_port()}")
    config = tmp_path / "bad.toml"
    config.write_text(mutate(valid))
    assert config.read_text() != valid
    result = subprocess.run([str(PGLEAP), "run", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """`pgleap run` with a config path that does not exist exits 2 and names the file."""
    missing = tmp_path / "nope.toml"
    result = subprocess.run([str(PGLEAP), "run", "-c", str(missing)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert "nope.toml" in result.stderr and "no such config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_exits_2(tmp_path: Path, pg_old: LabServer) -> None:
    """`pgleap run` on a port something else listens on exits 2 saying it cannot listen."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(render_config({"app": pg_old}).replace("listen_port = 0", f"listen_port = {port}"))
        result = subprocess.run([str(PGLEAP), "run", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert "cannot listen" in result.stderr and str(port) in result.stderr


def test_admin_shutdown_stops_process(tmp_path: Path, pg_old: LabServer) -> None:
    """SHUTDOWN on the admin console answers, then the process exits 0 and stops listening."""
    pg = ProxyProcess(tmp_path, {"app": pg_old})
    try:
        pg.wait_accepting()
        with psycopg.connect(pg.dsn(), autocommit=True) as app:
            assert app.execute("select 1").fetchone() == (1,)
        with psycopg.connect(pg.dsn("pgleap", "pgleap_admin", "admin-secret"), autocommit=True) as admin:
            assert admin.execute("SHUTDOWN").statusmessage == "SHUTDOWN"
        assert pg.wait_exit(30) == 0, pg.output()
        assert not accepts(pg.port)
    finally:
        pg.stop()
