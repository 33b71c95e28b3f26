"""LabServer: one real local PostgreSQL server, and init_server to create it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pgleap.lab import config
from pgleap.lab.binaries import client_tool
from pgleap.lab.conninfo import conninfo
from pgleap.lab.errors import LabError, ServerStartError
from pgleap.lab.install import PgInstall
from pgleap.lab.layout import prepare_rundir, write_owned
from pgleap.lab.osuser import check_server_user_can_reach, run
from pgleap.lab.pidfile import kill_server_processes, postmaster_pid, remove_stale_lockfiles
from pgleap.lab.ports import free_port

__all__ = ["LabError", "LabServer", "init_server"]

DEFAULT_SUPERUSER = "postgres"
DEFAULT_PASSWORD = "postgres-lab"
_START_ATTEMPTS = 3
_PORT_TAKEN = ("could not bind", "Address already in use", "could not create any TCP/IP sockets")


@dataclass
class LabServer:
    """A local PostgreSQL server under <basedir>/<name>, listening on 127.0.0.1 only."""

    name: str
    install: PgInstall
    datadir: Path
    port: int
    host: str = "127.0.0.1"
    superuser: str = DEFAULT_SUPERUSER
    password: str = DEFAULT_PASSWORD
    auth: str = "scram-sha-256"

    @property
    def major(self) -> int:
        """Major version of the server binaries."""
        return self.install.major

    @property
    def rundir(self) -> Path:
        """The directory holding datadir, socket dir and log."""
        return self.datadir.parent

    @property
    def socket_dir(self) -> Path:
        """Private unix socket directory (never /var/run/postgresql)."""
        return self.rundir / "sock"

    @property
    def logfile(self) -> Path:
        """Server log; kept beside the datadir so pg_basebackup does not copy it into replicas."""
        return self.rundir / "server.log"

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """libpq keyword/value connection string over TCP to 127.0.0.1."""
        return conninfo(
            host=self.host,
            port=self.port,
            dbname=dbname,
            user=user or self.superuser,
            password=self.password if password is None and user is None else password,
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def pid(self) -> int | None:
        """The postmaster pid, or None when it is not running."""
        return postmaster_pid(self.datadir)

    def is_running(self) -> bool:
        """Whether this server's postmaster is alive."""
        return self.pid() is not None

    def _log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.logfile.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 60) -> None:
        """Start and wait until it accepts connections; moves to a new port if this one got taken."""
        if self.is_running():
            return
        pg_ctl = str(self.install.tool("pg_ctl"))
        for attempt in range(1, _START_ATTEMPTS + 1):
            offset = self._log_size()
            result = run(
                [
                    pg_ctl,
                    "start",
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    str(max(1, int(timeout))),
                ],
                as_server=True,
                cwd=self.rundir,
                timeout=timeout + 30,
            )
            if result.returncode == 0 and self.is_running():
                return
            fresh_log = self._log_since(offset)
            if attempt < _START_ATTEMPTS and any(marker in fresh_log for marker in _PORT_TAKEN):
                self.port = free_port(self.host)
                config.update_settings(self.datadir, {"port": str(self.port)})
                continue
            self.kill()  # pg_ctl may give up while postgres is still starting; leave nothing behind
            raise ServerStartError(
                f"PostgreSQL {self.install.version} server {self.name!r} ({self.datadir}, port {self.port}) "
                f"did not start: {(result.stderr or result.stdout).strip()}\n"
                f"--- last lines of {self.logfile} ---\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """pg_ctl stop -m mode; SIGKILL of our postmaster and its children as the last resort."""
        if mode not in ("smart", "fast", "immediate"):
            raise LabError(f"stop mode {mode!r} must be smart, fast or immediate")
        if not self.is_running():
            return
        result = run(
            [
                str(self.install.tool("pg_ctl")),
                "stop",
                "-D",
                str(self.datadir),
                "-m",
                mode,
                "-w",
                "-t",
                str(max(1, int(timeout))),
            ],
            as_server=True,
            cwd=self.rundir,
            timeout=timeout + 30,
        )
        if result.returncode != 0 or self.is_running():
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash, for recovery tests)."""
        pid = self.pid()
        if pid is None:
            return
        if not kill_server_processes(pid):
            raise LabError(f"processes of server {self.name!r} (postmaster {pid}) survived SIGKILL")
        # A killed postmaster can stay a zombie until init reaps it, and postgres treats a
        # zombie's pid as "another postmaster is running"; its lock files are provably stale.
        remove_stale_lockfiles(self.datadir, self.socket_dir, pid)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql -At (ON_ERROR_STOP) over TCP; LabError carries psql's stderr."""
        result = run(
            [str(client_tool("psql")), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(dbname), "-c", sql],
            env={"PGCONNECT_TIMEOUT": "10"},
            timeout=300,
        )
        if result.returncode != 0:
            raise LabError(f"psql on {self.name!r} (port {self.port}) failed: {result.stderr.strip()}")
        return result.stdout.rstrip("\n")

    def server_version_num(self) -> int:
        """SHOW server_version_num, as an int."""
        return int(self.psql("SHOW server_version_num"))


def init_server(
    install: PgInstall,
    *,
    name: str,
    auth: str = "scram-sha-256",
    basedir: Path,
    settings: dict[str, str] | None = None,
    superuser: str = DEFAULT_SUPERUSER,
    password: str = DEFAULT_PASSWORD,
) -> LabServer:
    """initdb a new cluster in <basedir>/<name>/data and configure it; the server is not started."""
    config.check_auth(auth, install)
    initdb = install.tool("initdb")
    check_server_user_can_reach(initdb)
    rundir = prepare_rundir(basedir, name)
    check_server_user_can_reach(rundir)
    datadir = rundir / "data"
    pwfile = rundir / "pwfile"
    write_owned(pwfile, config.initdb_password(auth, superuser, password) + "\n")
    try:
        result = run(
            [
                str(initdb),
                "-D",
                str(datadir),
                "-U",
                superuser,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                f"--auth-host={auth}",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ],  # -N: no fsync; lab clusters need no durability
            as_server=True,
            cwd=rundir,
            timeout=300,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        shutil.rmtree(rundir, ignore_errors=True)
        raise LabError(
            f"initdb of PostgreSQL {install.version} for {name!r} failed:\n"
            f"{(result.stderr or result.stdout).strip()[-3000:]}"
        )
    server = LabServer(name, install, datadir, free_port(), superuser=superuser, password=password, auth=auth)
    write_owned(datadir / "pg_hba.conf", config.hba_text(auth))
    values = config.base_settings(install, port=server.port, socket_dir=server.socket_dir, auth=auth)
    values.update(settings or {})
    config.write_settings(datadir, values)
    return server
