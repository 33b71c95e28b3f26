"""Debian's postgresql-N packages under /usr/lib/postgresql, and probing binary versions."""

from __future__ import annotations

import functools
from pathlib import Path

from pgleap.lab.errors import LabError
from pgleap.lab.install import PgInstall
from pgleap.lab.osuser import run
from pgleap.lab.versions import major_of, parse_version_output

DEBIAN_ROOT = Path("/usr/lib/postgresql")


@functools.cache
def probe_version(binary: Path) -> str:
    """The version a PostgreSQL executable reports with --version (cached per path)."""
    result = run([str(binary), "--version"], timeout=30)
    if result.returncode != 0:
        raise LabError(f"{binary} --version failed: {(result.stderr or result.stdout).strip()}")
    return parse_version_output(result.stdout)


def debian_installs(root: Path = DEBIAN_ROOT) -> list[PgInstall]:
    """Installed postgresql-N packages (their /usr/lib/postgresql/N/bin)."""
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
