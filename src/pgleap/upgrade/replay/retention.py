"""Keeping the change log bounded: records replay has applied go, a window behind replay stays.

Without this the log grows with every write for as long as the upgrade mirrors, until the disk is full
(and then capture stops logging: the target must be copied again). SQLite reuses the pages freed, so a log
trimmed as fast as it grows stops growing. The window kept behind replay serves result comparison, which
looks back at the transactions between a read and replay's point, and SHOW UPGRADE QUERY TEXTS.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pgleap.store.changelog import ChangeLog, ChangeLogError

log = logging.getLogger(__name__)

CHUNK = 5_000  # deleted per change-log write group: a COMMIT held meanwhile waits for at most that many
# Records logged this recently are kept whatever their count: a busy source writes `retain` transactions in
# seconds, and a read result comparison is still judging may look back that far.
KEEP_SECONDS = 600.0
INTERVAL = 10.0  # seconds between trims once the log is down to the window


@dataclass
class LogRetention:
    """Deletes one database's applied records, `retain` positions behind replay, a chunk at a time."""

    changelog: ChangeLog
    database: str
    retain: int  # applied transactions kept behind replay ([pgleap] change_log_retain)
    chunk: int = CHUNK
    interval: float = INTERVAL
    keep_seconds: float = KEEP_SECONDS
    deleted: int = 0
    _next: float = 0.0

    async def trim(self, applied: int) -> None:
        """After replay applied through `applied`: delete a chunk if one is due; never fails replay."""
        now = time.monotonic()
        if now < self._next or applied <= self.retain:
            return
        try:
            below = applied - self.retain + 1
            n = await self.changelog.truncate_before(self.database, below, self.chunk, time.time() - self.keep_seconds)
        except ChangeLogError as exc:
            log.warning("change log of %s: applied records could not be deleted (%s)", self.database, exc)
            n = 0
        self.deleted += n
        # A full chunk: more is due, go on at the next step; otherwise wait (the log is down to the window).
        self._next = now if n >= self.chunk else now + self.interval
