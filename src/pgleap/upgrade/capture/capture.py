"""Capture of one database: where its sessions' committed transactions go, and what went wrong."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pgleap.store.changelog import ChangeLog, ChangeLogError
from pgleap.store.records import CapturedTransaction

log = logging.getLogger(__name__)


@dataclass
class CaptureProblem:
    """Something capture could not do for a session: shown in status, never silently dropped."""

    session_id: int
    what: str


@dataclass
class Capture:
    """Appends one database's committed transactions to the change log, in commit order."""

    database: str
    changelog: ChangeLog
    transactions: int = 0
    statements: int = 0
    log_failures: int = 0
    problems: list[CaptureProblem] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def record(self, transactions: list[CapturedTransaction]) -> None:
        """Log committed transactions; tasks are created in commit order, and the log keeps that order."""
        for tx in transactions:
            task = asyncio.ensure_future(self._append(tx))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _append(self, tx: CapturedTransaction) -> None:
        try:
            log_id = await self.changelog.prepare(tx)
            await self.changelog.settle(log_id, committed=True)
        except ChangeLogError as exc:
            # The client keeps working against the source (I5); the upgrade must re-copy what was lost.
            self.log_failures += 1
            log.error(
                "database %s: a committed transaction (txid %s) could not be logged: %s", self.database, tx.txid, exc
            )
            return
        self.transactions += 1
        self.statements += len(tx.statements)

    def report_unreplayable(self, session_id: int, what: str) -> None:
        """Note something a session did that replay cannot reproduce."""
        log.warning("database %s, session %s: %s cannot be replayed on the target", self.database, session_id, what)
        self.problems.append(CaptureProblem(session_id, what))

    async def drain(self) -> None:
        """Wait until every transaction handed to `record` has reached the log."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.changelog.flush()
