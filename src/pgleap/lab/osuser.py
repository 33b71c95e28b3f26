"""Which OS user runs the servers, and running commands as that user."""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from pgleap.clientenv import client_env
from pgleap.lab.errors import LabError

PREFERRED_USER = "postgres"
FALLBACK_USER = "pgleap"


@functools.cache
def server_user() -> str | None:
    """The unprivileged user servers run as when we are root (postgres refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in (PREFERRED_USER, FALLBACK_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    _create_fallback_user()
    return FALLBACK_USER


def _create_fallback_user() -> None:
    useradd = shutil.which("useradd")
    if useradd is None:
        raise LabError(
            f"no '{PREFERRED_USER}' user and no useradd to create '{FALLBACK_USER}'; "
            f"create an unprivileged user named {PREFERRED_USER} to run lab servers"
        )
    result = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise LabError(f"could not create system user {FALLBACK_USER}: {result.stderr.strip()}")


def as_server_user(argv: Sequence[str]) -> list[str]:
    """Prefix argv with runuser when we are root, so the command runs unprivileged."""
    user = server_user()
    if user is None:
        return list(argv)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", user, "--", *argv]


def give_to_server_user(path: Path) -> None:
    """chown path to the server user (no-op when not root)."""
    user = server_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without libpq variables, plus `extra` (messages in English, to match errors)."""
    return client_env(extra)


def run(
    argv: Sequence[str],
    *,
    as_server: bool = False,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output; never raises on a non-zero exit, only on timeout."""
    command = as_server_user(argv) if as_server else list(argv)
    try:
        return subprocess.run(
            command,
            cwd=cwd,
            env=clean_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s: {' '.join(argv)}") from exc
    except FileNotFoundError as exc:
        raise LabError(f"cannot execute {command[0]}: {exc.strerror}") from exc


def check_server_user_can_reach(path: Path) -> None:
    """Fail early, with the fix, when the server user cannot reach a path (e.g. a cache under /root)."""
    user = server_user()
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for directory in [*reversed(path.parents), path]:
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            continue
        if st.st_mode & stat.S_IXOTH == 0 and not (st.st_gid == entry.pw_gid and st.st_mode & stat.S_IXGRP):
            raise LabError(
                f"user {user} cannot reach {path}: {directory} is not searchable by others; "
                f"chmod o+x {directory}, or set PGLEAP_CACHE to a world-readable directory and fetch again"
            )
