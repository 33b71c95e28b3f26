"""Parsing and ordering of PostgreSQL and package version strings."""

from __future__ import annotations

import re

from pgleap.lab.errors import LabError

_VERSION_OUTPUT = re.compile(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)")
_NPM_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.]+))?$")


def parse_version_output(text: str) -> str:
    """Return "10.23" from `postgres --version` output such as "postgres (PostgreSQL) 10.23"."""
    match = _VERSION_OUTPUT.search(text)
    if match is None:
        raise LabError(f"cannot read a PostgreSQL version from {text.strip()!r}")
    return match.group(1)


def major_of(version: str) -> int:
    """Return the first component of a version ("10.23" -> 10); 9.x majors are not fetchable, so 9 is enough."""
    return int(version.split(".", 1)[0])


def npm_version_key(version: str) -> tuple[tuple[int, int, int], tuple[tuple[int, int | str], ...]]:
    """Sort key for npm versions like "17.10.0-beta.17" (numeric release, then numeric-aware pre-release)."""
    match = _NPM_VERSION.match(version)
    if match is None:
        raise LabError(f"unexpected npm version string {version!r}")
    release = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    pre = match.group(4) or ""
    pre_key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split(".") if p)
    return release, pre_key
