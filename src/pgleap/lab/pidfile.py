"""Finding and killing a server's own processes through its postmaster.pid."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is parenthesised and may contain spaces; the state follows it.
    return stat.rsplit(")", 1)[1].split()[0]


def _is_postgres(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv0 = cmdline.split(b"\0", 1)[0]
    return argv0.endswith((b"postgres", b"postmaster"))


def alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def postmaster_pid(datadir: Path) -> int | None:
    """The pid of the live postmaster of datadir, or None (checks the pid really is a postgres)."""
    try:
        first = (datadir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        pid = int(first)
    except (OSError, ValueError):
        return None
    if pid <= 0 or not alive(pid) or not _is_postgres(pid):
        return None
    return pid


def children(pid: int) -> list[int]:
    """Direct children of pid (the postmaster's backends and auxiliary processes)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_server_processes(pid: int, timeout: float = 10) -> bool:
    """SIGKILL a postmaster and its children, as a crash would; True once all are gone."""
    victims = [pid, *children(pid)]  # collect first: children are reparented once the parent dies
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(v) for v in victims):
            return True
        time.sleep(0.05)
    return False


def remove_stale_lockfiles(datadir: Path, socket_dir: Path, killed_pid: int) -> None:
    """Remove postmaster.pid and socket lock files that still name the postmaster we just killed."""
    if alive(killed_pid):
        return
    for lockfile in [datadir / "postmaster.pid", *socket_dir.glob(".s.PGSQL.*.lock")]:
        try:
            first = lockfile.read_text().split("\n", 1)[0].strip()
        except OSError:
            continue
        if first == str(killed_pid):
            lockfile.unlink(missing_ok=True)
