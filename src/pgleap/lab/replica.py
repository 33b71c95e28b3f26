"""Streaming replicas of lab servers: pg_basebackup, standby configuration, waiting for streaming."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pgleap.lab import config
from pgleap.lab.binaries import client_tool
from pgleap.lab.conninfo import conf_literal, conninfo, sql_literal
from pgleap.lab.errors import LabError
from pgleap.lab.layout import prepare_rundir, write_owned
from pgleap.lab.osuser import run
from pgleap.lab.ports import free_port
from pgleap.lab.server import LabServer

# Version-gated names (DESIGN.md "Version facts"): 9.x says xlog/location, 10+ says wal/lsn.
_PG10 = 100000
_PG12 = 120000


def _replay_column(version_num: int) -> str:
    return "replay_lsn" if version_num >= _PG10 else "replay_location"


def _insert_lsn_sql(version_num: int) -> str:
    # The insert position, not the write position: under asynchronous commit the last
    # commit record may not be written yet, and it is the one we want replayed.
    if version_num >= _PG10:
        return "SELECT pg_current_wal_insert_lsn()"
    return "SELECT pg_current_xlog_insert_location()"


def _replay_lsn_sql(version_num: int) -> str:
    return "SELECT pg_last_wal_replay_lsn()" if version_num >= _PG10 else "SELECT pg_last_xlog_replay_location()"


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> an integer position."""
    high, _, low = text.strip().partition("/")
    if not low:
        raise LabError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def standby_conninfo(primary: LabServer, application_name: str) -> str:
    """A minimal primary_conninfo: newer libpq options (passfile, channel_binding, sslsni...) break old walreceivers."""
    return conninfo(host=primary.host, port=primary.port, user=primary.superuser,
                    password=primary.password, application_name=application_name)


def _write_standby_config(replica: LabServer, primary: LabServer) -> None:
    info = conf_literal(standby_conninfo(primary, replica.name))
    datadir = replica.datadir
    if replica.install.version_num < _PG12:
        write_owned(datadir / "recovery.conf",
                    "# written by pgleap.lab\n"
                    "standby_mode = 'on'\n"
                    f"primary_conninfo = {info}\n"
                    "recovery_target_timeline = 'latest'\n")
        return
    # 12+ refuses to start with a recovery.conf; the signal file plus a setting replace it.
    write_owned(datadir / "standby.signal", "")
    auto = datadir / "postgresql.auto.conf"
    text = auto.read_text() if auto.exists() else ""
    write_owned(auto, text + ("" if text.endswith("\n") or not text else "\n") + f"primary_conninfo = {info}\n")


def _streaming_state(primary: LabServer, application_name: str) -> str:
    column = _replay_column(primary.install.version_num)
    return primary.psql(f"SELECT state || ' ' || coalesce({column}::text, '') FROM pg_stat_replication "
                        f"WHERE application_name = {sql_literal(application_name)}")


def wait_streaming(primary: LabServer, replica: LabServer, timeout: float = 60) -> None:
    """Wait until pg_stat_replication on the primary shows the replica streaming."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = _streaming_state(primary, replica.name)
        if state.startswith("streaming"):
            return
        time.sleep(0.1)
    raise LabError(f"replica {replica.name!r} is not streaming from {primary.name!r} after {timeout:.0f}s "
                   f"(pg_stat_replication: {state or 'no row'})\n"
                   f"--- last lines of {replica.logfile} ---\n{replica.log_tail()}")


def wait_for_replay(primary: LabServer, replica: LabServer, timeout: float = 30) -> None:
    """Wait until the replica has replayed everything the primary had written when called."""
    target = parse_lsn(primary.psql(_insert_lsn_sql(primary.install.version_num)))
    deadline = time.monotonic() + timeout
    replayed = 0
    while time.monotonic() < deadline:
        text = replica.psql(_replay_lsn_sql(replica.install.version_num))
        replayed = parse_lsn(text) if text else 0
        if replayed >= target:
            return
        time.sleep(0.05)
    raise LabError(f"replica {replica.name!r} replayed up to {replayed:X}, primary is at {target:X}; "
                   f"still behind after {timeout:.0f}s")


def create_replica(primary: LabServer, *, name: str, basedir: Path, timeout: float = 120) -> LabServer:
    """pg_basebackup the running primary into <basedir>/<name>, start it as a hot standby, wait for streaming."""
    if not primary.is_running():
        raise LabError(f"primary {primary.name!r} is not running; start it before creating a replica")
    pg_basebackup = client_tool("pg_basebackup", min_major=primary.major)
    rundir = prepare_rundir(basedir, name)
    datadir = rundir / "data"
    source = conninfo(host=primary.host, port=primary.port, user=primary.superuser, password=primary.password)
    result = run([str(pg_basebackup), "-D", str(datadir), "-d", source, "-X", "stream", "-c", "fast", "-w"],
                 as_server=True, cwd=rundir, timeout=timeout)
    if result.returncode != 0:
        shutil.rmtree(rundir, ignore_errors=True)
        raise LabError(f"pg_basebackup from {primary.name!r} (port {primary.port}) failed: {result.stderr.strip()}")
    replica = LabServer(name, primary.install, datadir, free_port(), superuser=primary.superuser,
                        password=primary.password, auth=primary.auth)
    settings = config.base_settings(primary.install, port=replica.port, socket_dir=replica.socket_dir,
                                    auth=primary.auth)
    config.update_settings(datadir, settings)
    _write_standby_config(replica, primary)
    replica.start(timeout=timeout)
    try:
        wait_streaming(primary, replica, timeout=timeout)
    except LabError:
        replica.stop()
        raise
    return replica
