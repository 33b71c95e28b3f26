"""Real local PostgreSQL servers of several majors, for tests and the demo."""

from pgleap.lab.binaries import PgInstall, client_tool, find_install
from pgleap.lab.cache import cache_dir
from pgleap.lab.errors import FetchError, LabError, MissingBinaryError, ServerStartError
from pgleap.lab.fetch import fetch
from pgleap.lab.lab import Lab
from pgleap.lab.replica import create_replica, wait_for_replay, wait_streaming
from pgleap.lab.server import LabServer, init_server

__all__ = [
    "FetchError",
    "Lab",
    "LabError",
    "LabServer",
    "MissingBinaryError",
    "PgInstall",
    "ServerStartError",
    "cache_dir",
    "client_tool",
    "create_replica",
    "fetch",
    "find_install",
    "init_server",
    "wait_for_replay",
    "wait_streaming",
]
