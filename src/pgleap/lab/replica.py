"""Streaming replicas of lab servers, made by the engine's provision_replica; waiting for replay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pgleap.config import ServerConfig
from pgleap.errors import PgleapError
from pgleap.lab import config
from pgleap.lab.binaries import client_tool
from pgleap.lab.conninfo import sql_literal
from pgleap.lab.errors import LabError
from pgleap.lab.layout import prepare_rundir
from pgleap.lab.pidfile import postmaster_pid
from pgleap.lab.ports import free_port
from pgleap.lab.server import LabServer
from pgleap.upgrade.compat import facts_for

T = TypeVar("T")

# Settings the lab keeps in pgleap.conf, where LabServer.start moves the port when it was taken.
_LAB_OWNED = ("port", "listen_addresses", "unix_socket_directories", "unix_socket_directory")


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> an integer position."""
    high, _, low = text.strip().partition("/")
    if not low:
        raise LabError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def _streaming_state(primary: LabServer, application_name: str) -> str:
    sql = facts_for(primary.install.version_num).replication_state_sql()
    return primary.psql(f"SELECT s.state FROM ({sql}) s WHERE s.application_name = {sql_literal(application_name)}")


def wait_streaming(primary: LabServer, replica: LabServer, timeout: float = 60) -> None:
    """Wait until pg_stat_replication on the primary shows the replica streaming."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = _streaming_state(primary, replica.name)
        if state == "streaming":
            return
        time.sleep(0.1)
    raise LabError(
        f"replica {replica.name!r} is not streaming from {primary.name!r} after {timeout:.0f}s "
        f"(pg_stat_replication: {state or 'no row'})\n"
        f"--- last lines of {replica.logfile} ---\n{replica.log_tail()}"
    )


def wait_for_replay(primary: LabServer, replica: LabServer, timeout: float = 30) -> None:
    """Wait until the replica has replayed everything the primary had written when called."""
    # The insert position, not the write position: under asynchronous commit the last
    # commit record may not be written yet, and it is the one we want replayed.
    target = parse_lsn(primary.psql(facts_for(primary.install.version_num).current_lsn_sql()))
    replay_sql = facts_for(replica.install.version_num).replay_lsn_sql()
    deadline = time.monotonic() + timeout
    replayed = 0
    while time.monotonic() < deadline:
        text = replica.psql(replay_sql)
        replayed = parse_lsn(text) if text else 0
        if replayed >= target:
            return
        time.sleep(0.05)
    raise LabError(
        f"replica {replica.name!r} replayed up to {replayed:X}, primary is at {target:X}; "
        f"still behind after {timeout:.0f}s"
    )


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from code already inside an event loop (async tests): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _source_of(primary: LabServer) -> ServerConfig:
    return ServerConfig(
        host=primary.host, port=primary.port, database="postgres", user=primary.superuser, password=primary.password
    )


def _adopt_settings(replica: LabServer) -> None:
    """Make pgleap.conf the replica's own (it is the primary's copy) and let it decide where the replica listens."""
    from pgleap.upgrade.copy.provision import remove_settings, settings_file

    values = config.base_settings(replica.install, port=replica.port, socket_dir=replica.socket_dir, auth=replica.auth)
    config.update_settings(replica.datadir, values)
    # Same values as the engine wrote in postgresql.auto.conf, which would otherwise override a port
    # that LabServer.start moves in pgleap.conf on a later restart.
    remove_settings(settings_file(replica.datadir, facts_for(replica.install.version_num)), _LAB_OWNED)


def create_replica(primary: LabServer, *, name: str, basedir: Path, timeout: float = 120) -> LabServer:
    """A hot standby of the running primary in <basedir>/<name>, via provision_replica; returned once it streams."""
    from pgleap.upgrade.copy.provision import provision_replica  # the engine imports lab helpers at load time

    if not primary.is_running():
        raise LabError(f"primary {primary.name!r} is not running; start it before creating a replica")
    rundir = prepare_rundir(basedir, name)
    replica = LabServer(
        name,
        primary.install,
        rundir / "data",
        free_port(),
        superuser=primary.superuser,
        password=primary.password,
        auth=primary.auth,
    )
    try:
        # The replica runs the primary's own binaries; pg_basebackup comes from the newest full toolset.
        _run_coroutine(
            provision_replica(
                _source_of(primary),
                replica.datadir,
                replica.port,
                bindir=primary.install.bindir,
                basebackup=client_tool("pg_basebackup", min_major=primary.major),
                host=replica.host,
                socket_dir=replica.socket_dir,
                logfile=replica.logfile,
                application_name=name,
                timeout=timeout,
            )
        )
    except PgleapError as exc:
        if postmaster_pid(replica.datadir) is None:
            shutil.rmtree(rundir, ignore_errors=True)
        raise LabError(f"replica {name!r} of {primary.name!r}: {exc}") from exc
    _adopt_settings(replica)
    return replica
