"""Exceptions raised by the lab (local PostgreSQL servers for tests and the demo)."""

from __future__ import annotations


class LabError(Exception):
    """A lab server or its binaries could not be provided or operated."""


class MissingBinaryError(LabError):
    """PostgreSQL binaries of the requested major or tool are not installed."""


class FetchError(LabError):
    """Downloading or unpacking PostgreSQL binaries failed."""


class ServerStartError(LabError):
    """A lab server did not start; the message carries the tail of its log."""
