"""Tests of pgleap.lab: binaries, real servers of several majors, streaming replicas."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from pgleap.lab import Lab, LabError, LabServer, MissingBinaryError, client_tool, find_install, wait_for_replay
from pgleap.lab.cache import MARKER, STAGING_PREFIX, cache_dir, cached_installs
from pgleap.lab.config import initdb_password
from pgleap.lab.conninfo import conf_literal, conninfo
from pgleap.lab.pidfile import alive
from pgleap.lab.replica import parse_lsn
from pgleap.lab.versions import npm_version_key, parse_version_output
from pgleap.upgrade.compat import version_num_of

# Fixtures of tests/conftest_lab.py: module_lab, pg10_primary, pg17_primary.
pytest_plugins = ["conftest_lab"]


# --- units: no servers -----------------------------------------------------------------


def test_version_parsing() -> None:
    assert parse_version_output("postgres (PostgreSQL) 10.23\n") == "10.23"
    assert version_num_of("10.23") == 100023
    assert version_num_of("9.6.24") == 90624
    assert version_num_of("9.3") == 90300


def test_npm_versions_sort_numerically() -> None:
    versions = ["17.9.0-beta.17", "17.10.0-beta.16", "17.10.0-beta.17", "17.2.0-beta.15"]
    assert max(versions, key=npm_version_key) == "17.10.0-beta.17"
    assert npm_version_key("11.22.1-beta.10") > npm_version_key("11.22.1-beta.9")


def test_conninfo_quoting() -> None:
    assert conninfo(host="127.0.0.1", port=5432, password=None) == "host=127.0.0.1 port=5432"
    assert conninfo(password="it's a pw") == r"password='it\'s a pw'"
    assert conf_literal("a'b") == "'a''b'"


def test_parse_lsn() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848


def test_md5_password_is_prehashed() -> None:
    # PostgreSQL stores md5 passwords as "md5" + md5(password + username).
    assert initdb_password("md5", "alice", "secret") == "md5" + hashlib.md5(b"secretalice").hexdigest()
    assert initdb_password("scram-sha-256", "alice", "secret") == "secret"


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGLEAP_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("PGLEAP_CACHE")
    expected = Path("/var/cache/pgleap") if os.geteuid() == 0 else Path.home() / ".cache" / "pgleap"
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == expected


def test_missing_major_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGLEAP_CACHE", str(tmp_path))
    with pytest.raises(MissingBinaryError) as raised:
        find_install(10)
    message = str(raised.value)
    assert "PostgreSQL 10 binaries not found" in message
    assert str(tmp_path) in message
    assert "scripts/setup" in message and "python -m pgleap.lab fetch --major 10" in message


def test_missing_client_tool_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGLEAP_CACHE", str(tmp_path))
    with pytest.raises(MissingBinaryError, match="fetch --major 18"):
        client_tool("pg_dump", min_major=99)


def test_partial_download_is_not_an_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A fetch killed half way leaves a staging dir, or (older layouts) a dir without marker.
    for leftover in (tmp_path / f"{STAGING_PREFIX}abc", tmp_path / "pg10-npm-10.23"):
        (leftover / "package/native/bin").mkdir(parents=True)
        (leftover / "package/native/bin/postgres").write_text("")
    monkeypatch.setenv("PGLEAP_CACHE", str(tmp_path))
    assert cached_installs() == []
    assert not (tmp_path / "pg10-npm-10.23" / MARKER).exists()
    with pytest.raises(MissingBinaryError):
        find_install(10)


# --- integration: real servers -----------------------------------------------------------

integration = pytest.mark.integration


def _major_of(server: LabServer) -> int:
    return server.server_version_num() // 10000


@integration
def test_pg10_replica_via_recovery_conf(module_lab: Lab, pg10_primary: LabServer) -> None:
    replica = module_lab.replica(pg10_primary)
    assert (replica.datadir / "recovery.conf").is_file()
    assert not (replica.datadir / "standby.signal").exists()
    assert _major_of(pg10_primary) == 10 and _major_of(replica) == 10
    assert replica.psql("SELECT pg_is_in_recovery()") == "t"
    pg10_primary.psql("CREATE TABLE t10 (id int PRIMARY KEY, v text); INSERT INTO t10 VALUES (1, 'one'), (2, 'two')")
    wait_for_replay(pg10_primary, replica)
    assert replica.psql("SELECT string_agg(v, ',' ORDER BY id) FROM t10") == "one,two"
    state = pg10_primary.psql("SELECT state, replay_lsn IS NOT NULL FROM pg_stat_replication")
    assert state == "streaming|t"


@integration
def test_pg17_replica_via_standby_signal(module_lab: Lab, pg17_primary: LabServer) -> None:
    replica = module_lab.replica(pg17_primary)
    assert (replica.datadir / "standby.signal").is_file()
    assert not (replica.datadir / "recovery.conf").exists()
    auto = (replica.datadir / "postgresql.auto.conf").read_text()
    conninfo_line = next(line for line in auto.splitlines() if line.startswith("primary_conninfo"))
    for option in ("passfile", "channel_binding", "sslsni", "sslmode"):
        assert option not in conninfo_line  # minimal, so old walreceivers accept it too
    pg17_primary.psql("CREATE TABLE t17 AS SELECT g AS id FROM generate_series(1, 1000) g")
    wait_for_replay(pg17_primary, replica)
    assert replica.psql("SELECT count(*) FROM t17") == "1000"
    assert _major_of(replica) == 17


@integration
@pytest.mark.parametrize("major", [15, 17, 18])
def test_target_starts_with_right_major(module_lab: Lab, major: int) -> None:
    target = module_lab.target(major)
    assert target.server_version_num() // 10000 == major
    assert target.psql("SELECT version()").startswith(f"PostgreSQL {major}.")
    assert target.psql("SHOW listen_addresses") == "127.0.0.1"
    assert target.psql("SHOW unix_socket_directories") == str(target.socket_dir)
    target.stop()
    assert not target.is_running()


@integration
def test_scram_auth_stores_scram_and_rejects_wrong_password(pg10_primary: LabServer) -> None:
    stored = pg10_primary.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
    assert stored.startswith("SCRAM-SHA-256$")
    bad = LabServer("bad", pg10_primary.install, pg10_primary.datadir, pg10_primary.port, password="wrong")
    with pytest.raises(LabError, match="password authentication failed"):
        bad.psql("SELECT 1")


@integration
def test_md5_auth_is_really_md5_on_18(module_lab: Lab) -> None:
    server = module_lab.target(18, auth="md5")
    assert server.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'postgres'") == "md5"
    assert server.psql("SHOW password_encryption") == "md5"
    assert server.psql("SELECT 1") == "1"  # the md5 hba rule accepted the password


@integration
def test_psql_error_carries_stderr(pg17_primary: LabServer) -> None:
    with pytest.raises(LabError, match='relation "no_such_table" does not exist'):
        pg17_primary.psql("SELECT * FROM no_such_table")


@integration
def test_kill_then_restart_keeps_committed_rows(module_lab: Lab) -> None:
    server = module_lab.target(15)
    server.psql("CREATE TABLE crash (id int); INSERT INTO crash SELECT generate_series(1, 100)")
    pid = server.pid()
    assert pid is not None
    server.kill()
    assert not server.is_running() and not alive(pid)
    server.start()
    assert server.psql("SELECT count(*) FROM crash") == "100"
    assert "database system was interrupted" in server.logfile.read_text()


@integration
def test_start_moves_to_a_free_port_when_taken(module_lab: Lab) -> None:
    server = module_lab.target(17, start=False)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    squatter.bind(("127.0.0.1", server.port))
    squatter.listen(1)
    taken = server.port
    try:
        server.start()
    finally:
        squatter.close()
    assert server.port != taken
    assert server.psql("SHOW port") == str(server.port)


@integration
def test_lab_exit_stops_servers_and_removes_its_dir() -> None:
    with Lab() as own:
        server = own.primary(17, auth="trust")
        pid = server.pid()
        basedir = own.basedir
        assert pid is not None and basedir.is_dir()
    assert not alive(pid)
    assert not basedir.exists()


@integration
def test_failed_start_reports_log_tail(module_lab: Lab) -> None:
    server = module_lab.target(17, settings={"shared_buffers": "not-a-size"}, start=False)
    with pytest.raises(LabError, match="shared_buffers") as raised:
        server.start(timeout=20)
    assert "last lines of" in str(raised.value)
    assert not server.is_running()
