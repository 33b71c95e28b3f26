"""The per-server directory layout: <basedir>/<name>/{data, sock, server.log}."""

from __future__ import annotations

import re
from pathlib import Path

from pgleap.lab.errors import LabError
from pgleap.lab.osuser import give_to_server_user

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")


def prepare_rundir(basedir: Path, name: str) -> Path:
    """Create <basedir>/<name> and its socket dir, owned by the server user, private (0700)."""
    if not _NAME.match(name):
        raise LabError(f"server name {name!r} must be 1-41 letters, digits, '_', '.' or '-'")
    rundir = basedir / name
    try:
        rundir.mkdir(mode=0o700)
    except FileExistsError as exc:
        raise LabError(f"{rundir} already exists; pick another server name or basedir") from exc
    (rundir / "sock").mkdir(mode=0o700)
    for path in (rundir, rundir / "sock"):
        path.chmod(0o700)
        give_to_server_user(path)
    return rundir


def write_owned(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file the server user owns (config files the server must read)."""
    path.write_text(text)
    path.chmod(mode)
    give_to_server_user(path)
