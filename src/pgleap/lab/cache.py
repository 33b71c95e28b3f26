"""The binary cache directory: location, completion markers and the fetch lock."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pgleap.lab.install import PgInstall

# A directory counts as an install only once this file is inside it; fetch writes it
# last, in a staging directory, and then renames the whole directory into place.
MARKER = ".pgleap-install.json"
STAGING_PREFIX = ".staging-"
LOCK_NAME = ".lock"


@dataclass(frozen=True)
class InstallRecord:
    """What the marker file of a cached install says."""

    major: int
    version: str
    source: str
    package: str
    bindir: str  # relative to the install directory, so the cache can be moved


def cache_dir() -> Path:
    """PGLEAP_CACHE, else /var/cache/pgleap as root, else $XDG_CACHE_HOME/pgleap (~/.cache/pgleap)."""
    explicit = os.environ.get("PGLEAP_CACHE")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/cache/pgleap")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pgleap"


def read_marker(directory: Path) -> InstallRecord | None:
    """The record of a complete install in `directory`, or None if it is absent or unreadable."""
    try:
        data = json.loads((directory / MARKER).read_text())
        return InstallRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_marker(directory: Path, record: InstallRecord) -> None:
    """Write the completion marker (call it last, before the atomic rename)."""
    (directory / MARKER).write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.chmod(directory / MARKER, 0o644)


def cached_installs(root: Path | None = None) -> list[PgInstall]:
    """Every complete install in the cache; staging directories and unmarked leftovers are ignored."""
    root = cache_dir() if root is None else root
    if not root.is_dir():
        return []
    installs: list[PgInstall] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        record = read_marker(entry)
        if record is None:
            continue
        bindir = entry / record.bindir
        if (bindir / "postgres").is_file():
            installs.append(PgInstall(record.major, record.version, bindir, record.source))
    return installs


@contextmanager
def cache_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache so concurrent fetches do not race."""
    with open(root / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
