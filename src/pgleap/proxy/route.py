"""Where a database's sessions send their transactions; the upgrade engine switches it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pgleap.config import ServerConfig, UpgradeConfig
from pgleap.proxy.stats import DatabaseStats

REVERSE_SUFFIX = "@reverse"
READ_SHIFT_ROLE = "read shift"  # Session.server_role of a read-only session sent to the target (read_shift.py)


def reverse_name(database: str) -> str:
    """The change-log name of writes made on the target after cutover (the reverse log, for rollback)."""
    return database + REVERSE_SUFFIX


@dataclass
class Route:
    """The server sessions of one database use; sessions move at their next transaction boundary."""

    server: ServerConfig
    role: str = "source"  # "source" or "target"
    version: int = 0

    def switch(self, server: ServerConfig, role: str) -> None:
        """Send every session's next transaction to `server`."""
        self.server = server
        self.role = role
        self.version += 1


@dataclass
class Database:
    """A client-facing database: its upgrade entry, its route and its counters."""

    upgrade: UpgradeConfig
    route: Route
    stats: DatabaseStats
    capture: Any = None  # a pgleap.upgrade.capture.Capture while the upgrade captures writes
    # server_version of each side ("source", "target") as its servers last reported it: the version
    # adapters rewrite what clients send to the target in the source's names.
    server_versions: dict[str, str] = field(default_factory=dict)

    @property
    def log_name(self) -> str:
        """Under which name this database's writes are logged now: its own, or its reverse log after cutover."""
        return reverse_name(self.upgrade.database) if self.route.role == "target" else self.upgrade.database

    def note_server_version(self, role: str, server_version: str) -> None:
        """A server of `role` ("source", "target"; a read-shifted session counts for the target) answered."""
        if server_version:
            self.server_versions["target" if role == READ_SHIFT_ROLE else role] = server_version

    @classmethod
    def from_config(cls, upgrade: UpgradeConfig) -> Database:
        """A database routed to its source."""
        return cls(upgrade=upgrade, route=Route(server=upgrade.source), stats=DatabaseStats())
