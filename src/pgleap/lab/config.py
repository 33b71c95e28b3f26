"""Server configuration the lab writes: authentication, pg_hba.conf and pgleap.conf."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from pgleap.lab.conninfo import conf_literal
from pgleap.lab.errors import LabError
from pgleap.lab.install import PgInstall
from pgleap.lab.layout import write_owned

AUTH_METHODS = ("scram-sha-256", "md5", "password", "trust")
SETTINGS_FILE = "pgleap.conf"
_INCLUDE_LINE = f"include '{SETTINGS_FILE}'  # added by pgleap.lab; later lines win\n"


def check_auth(auth: str, install: PgInstall) -> None:
    """Reject an auth method the server version cannot do."""
    if auth not in AUTH_METHODS:
        raise LabError(f"unknown auth method {auth!r}; use one of {', '.join(AUTH_METHODS)}")
    if auth == "scram-sha-256" and install.version_num < 100000:
        raise LabError(f"PostgreSQL {install.version} has no SCRAM (10+); use auth='md5'")


def initdb_password(auth: str, user: str, password: str) -> str:
    """Content of initdb's --pwfile: what makes `auth` really be exercised."""
    if auth == "md5":
        # Pre-hashed, so the role stores an md5 hash even where password_encryption defaults
        # to scram (14+); md5 rules in pg_hba would otherwise silently use SCRAM.
        return "md5" + hashlib.md5((password + user).encode()).hexdigest()
    # Cleartext: initdb hashes it with SCRAM when --auth-host is scram-sha-256. A pre-hashed
    # SCRAM verifier does not work: initdb of 10 truncates pwfile lines to 100 bytes.
    return password


def hba_text(auth: str) -> str:
    """pg_hba.conf: TCP on 127.0.0.1 only with `auth`; the unix socket lives in a private 0700 dir."""
    return (
        "# written by pgleap.lab\n"
        "# TYPE  DATABASE     USER  ADDRESS       METHOD\n"
        "local   all          all                 trust\n"
        f"host    all          all   127.0.0.1/32  {auth}\n"
        f"host    replication  all   127.0.0.1/32  {auth}\n"
    )


def base_settings(install: PgInstall, *, port: int, socket_dir: Path, auth: str) -> dict[str, str]:
    """postgresql.conf settings for a lab server of this version (primary-capable, replica-friendly)."""
    num = install.version_num
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        ("unix_socket_directories" if num >= 90300 else "unix_socket_directory"): str(socket_dir),
        "wal_level": "replica" if num >= 90600 else "hot_standby",
        "max_wal_senders": "10",
        ("wal_keep_size" if num >= 130000 else "wal_keep_segments"): "256MB" if num >= 130000 else "16",
        "hot_standby": "on",
        # Lab only: durability against OS crashes is traded for speed. A killed server
        # (kill -9) still loses no commit, since written data stays in the OS page cache.
        # synchronous_commit stays on: with it off, kill -9 loses recent commits, which
        # would break the crash tests of invariant I4.
        "fsync": "off",
        "shared_buffers": "32MB",
        "max_connections": "100",
        "logging_collector": "off",
        "lc_messages": "C",
    }
    if auth == "md5":
        settings["password_encryption"] = "md5"
    elif auth == "scram-sha-256":
        settings["password_encryption"] = "scram-sha-256"
    return settings


def write_settings(datadir: Path, settings: Mapping[str, str]) -> None:
    """Write pgleap.conf and include it from postgresql.conf (idempotent)."""
    lines = ["# written by pgleap.lab; rewritten on port changes\n"]
    lines += [f"{key} = {conf_literal(value)}\n" for key, value in settings.items()]
    write_owned(datadir / SETTINGS_FILE, "".join(lines))
    main = datadir / "postgresql.conf"
    text = main.read_text()
    if _INCLUDE_LINE not in text:
        write_owned(main, text + ("" if text.endswith("\n") else "\n") + _INCLUDE_LINE)


def read_settings(datadir: Path) -> dict[str, str]:
    """Settings from our own pgleap.conf (a format we wrote: key = 'value')."""
    settings: dict[str, str] = {}
    for line in (datadir / SETTINGS_FILE).read_text().splitlines():
        if "=" not in line or line.lstrip().startswith("#"):
            continue
        key, value = line.split("=", 1)
        settings[key.strip()] = value.strip()[1:-1].replace("''", "'")
    return settings


def update_settings(datadir: Path, changes: Mapping[str, str]) -> None:
    """Change some settings in pgleap.conf, keeping the others."""
    settings = read_settings(datadir)
    settings.update(changes)
    write_settings(datadir, settings)
