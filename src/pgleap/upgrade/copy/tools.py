"""PostgreSQL client programs of the target's major (pg_dump, pg_restore, pg_dumpall), run asynchronously."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pgleap.clientenv import client_env
from pgleap.config import ServerConfig
from pgleap.upgrade.copy.errors import ToolError

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")


def _major_of(path: Path) -> int | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out)
    return int(match.group(1)) if match else None


def find_tool(name: str, min_major: int, bindir: Path | None = None) -> Path:
    """`name` of major >= min_major: from bindir if given, else the lab cache / Debian installs, else PATH."""
    candidates: list[Path] = []
    if bindir is not None:
        candidates.append(bindir / name)
    else:
        try:
            from pgleap.lab.binaries import client_tool  # the same places the lab installs to

            candidates.append(client_tool(name, min_major=min_major))
        except Exception:
            pass
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for path in candidates:
        major = _major_of(path)
        if major is not None and major >= min_major:
            return path
    where = str(bindir) if bindir else "the pgleap cache, /usr/lib/postgresql/*/bin and PATH"
    raise ToolError(
        f"no {name} of PostgreSQL {min_major} or later in {where}; the schema must be dumped with "
        f"the target's major: install its client programs (e.g. apt-get install "
        f"postgresql-client-{min_major})"
    )


def conninfo(server: ServerConfig, database: str | None = None) -> str:
    """A libpq connection string without the password (that goes in PGPASSWORD)."""

    def q(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return f"host={q(server.host)} port={server.port} dbname={q(database or server.database)} user={q(server.user)}"


def tool_env(server: ServerConfig) -> dict[str, str]:
    """Environment for a client program: no stray libpq variables, the password, English messages."""
    env = client_env({"PGCONNECT_TIMEOUT": "10"})  # pg_restore's messages are parsed
    if server.password is not None:
        env["PGPASSWORD"] = server.password
    return env


@dataclass(frozen=True)
class ToolResult:
    """Exit code and output of a client program."""

    returncode: int
    stdout: str
    stderr: str


async def run_tool(argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> ToolResult:
    """Run a program without blocking the event loop (the progress display keeps updating)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return ToolResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
