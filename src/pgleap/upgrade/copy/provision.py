"""`pgleap replica create`: provision Bob from Alice with pg_basebackup and wait until it streams."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from pgleap.config import ServerConfig
from pgleap.lab.osuser import give_to_server_user, run
from pgleap.upgrade.compat import facts_for
from pgleap.upgrade.compat.facts import PG12
from pgleap.upgrade.copy.connect import connect, version_num
from pgleap.upgrade.copy.errors import CopyError, ToolError
from pgleap.upgrade.copy.tools import conninfo, find_tool, tool_env


def _conf(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def standby_conninfo(source: ServerConfig, application_name: str) -> str:
    """A minimal primary_conninfo: pg_basebackup -R of newer majors adds options old walreceivers reject."""
    parts = [f"host={source.host}", f"port={source.port}", f"user={source.user}",
             f"application_name={application_name}"]
    if source.password is not None:
        parts.append("password=" + "'" + source.password.replace("\\", "\\\\").replace("'", "\\'") + "'")
    return " ".join(parts)


def write_standby_config(datadir: Path, version_num_: int, source: ServerConfig, port: int, name: str) -> None:
    """recovery.conf before 12; standby.signal plus primary_conninfo from 12 (which refuses a recovery.conf)."""
    info = _conf(standby_conninfo(source, name))
    auto = datadir / "postgresql.auto.conf"
    text = auto.read_text() if auto.exists() else ""
    lines = [f"port = {port}", "hot_standby = on", "unix_socket_directories = ''"]
    if version_num_ >= PG12:
        (datadir / "standby.signal").write_text("")
        give_to_server_user(datadir / "standby.signal")
        lines.append(f"primary_conninfo = {info}")
    else:
        recovery = datadir / "recovery.conf"
        recovery.write_text(f"standby_mode = 'on'\nprimary_conninfo = {info}\nrecovery_target_timeline = 'latest'\n")
        recovery.chmod(0o600)
        give_to_server_user(recovery)
    auto.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "\n".join(lines) + "\n")
    give_to_server_user(auto)


async def _wait_streaming(source: ServerConfig, name: str, timeout: float) -> None:
    conn = await connect(source, role="source")
    try:
        facts = facts_for(await version_num(conn))
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            rows = await conn.fetch(facts.replication_state_sql())
            state = next((r[1] for r in rows if r[0] == name), None)
            if state == "streaming":
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    raise CopyError(f"the new replica {name!r} is not streaming after {timeout:.0f}s (pg_stat_replication: "
                    f"{state or 'no row'}); see its log beside the data directory")


async def provision_replica(source: ServerConfig, datadir: Path, port: int, *, bindir: Path | None = None,
                            host: str = "127.0.0.1", timeout: float = 120) -> ServerConfig:
    """Base-backup `source` into datadir, start it as a hot standby on `port`, return once it streams."""
    conn = await connect(source, role="source")
    try:
        vnum = await version_num(conn)
    finally:
        await conn.close()
    major = vnum // 10000 if vnum >= 100000 else vnum // 100
    if datadir.exists() and any(datadir.iterdir()):
        raise CopyError(f"{datadir} is not empty; give pgleap replica create a new data directory")
    datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
    give_to_server_user(datadir)
    # The server binaries must be the source's major; pg_basebackup may be newer.
    server_bindir = bindir or _server_bindir(vnum)
    basebackup = find_tool("pg_basebackup", vnum // 10000, server_bindir)
    env = tool_env(source)
    result = run([str(basebackup), "-D", str(datadir), "-d", conninfo(source), "-X", "stream", "-c", "fast", "-w"],
                 as_server=True, env={"PGPASSWORD": env.get("PGPASSWORD", "")}, timeout=timeout * 10)
    if result.returncode != 0:
        raise ToolError(f"pg_basebackup from {source.describe()} failed: {result.stderr.strip()}; the source "
                        f"needs a replication entry in pg_hba.conf and a free max_wal_senders slot")
    name = f"pgleap_replica_{port}"
    write_standby_config(datadir, vnum, source, port, name)
    logfile = datadir.parent / f"{datadir.name}.log"
    result = run([str(server_bindir / "pg_ctl"), "start", "-D", str(datadir), "-l", str(logfile), "-w",
                  "-t", str(int(timeout))], as_server=True, cwd=datadir.parent, timeout=timeout + 30)
    if result.returncode != 0:
        raise ToolError(f"the replica in {datadir} (PostgreSQL {major}) did not start: "
                        f"{(result.stderr or result.stdout).strip()}; see {logfile}")
    await _wait_streaming(source, name, timeout)
    return replace(source, host=host, port=port)


def _server_bindir(vnum: int) -> Path:
    from pgleap.lab.binaries import find_install  # the lab's cache and Debian's /usr/lib/postgresql

    try:
        return find_install(vnum // 10000 if vnum >= 100000 else 9).bindir
    except Exception as exc:
        raise ToolError(f"no server binaries of the source's major; pass --bindir: {exc}") from exc
