"""Capture of one database: where its sessions' committed transactions go, and what went wrong."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from pgleap.store.changelog import ChangeLog, ChangeLogError
from pgleap.store.records import CapturedTransaction
from pgleap.upgrade.capture.catalog import SourceCatalog

log = logging.getLogger(__name__)

# How long a COMMIT may wait for its change-log record to become durable. Past it the COMMIT goes
# to the source anyway (clients never stop because of the upgrade, I5) and the failure is counted.
PREPARE_TIMEOUT = 10.0


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
    logged_after_commit: int = 0  # transactions appended only after the source's COMMIT answer
    problems: list[CaptureProblem] = field(default_factory=list)
    catalog: SourceCatalog | None = None  # the source's tables, for row images; None: statements only
    inserts_without_image: int = 0  # INSERTs replayed as statements (verification checks their tables)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def prepare(self, tx: CapturedTransaction) -> int | None:
        """Durably log `tx` as pending before its COMMIT goes to the source; None if the log cannot take it."""
        try:
            return await asyncio.wait_for(self.changelog.prepare(tx), PREPARE_TIMEOUT)
        except (ChangeLogError, TimeoutError) as exc:
            self._lost(tx, exc if isinstance(exc, ChangeLogError) else f"no answer within {PREPARE_TIMEOUT:g} s")
            return None

    def settle(self, log_id: int, tx: CapturedTransaction | None, committed: bool) -> None:
        """The source answered the COMMIT of the record `log_id` prepared: mark it committed or aborted."""
        self._spawn(self._settle(log_id, tx, committed))

    def record_late(self, tx: CapturedTransaction) -> None:
        """Log a committed transaction whose COMMIT could not be held (it sat inside one query string).

        A crash between the source's answer and this append loses it from the log: it is counted,
        so that status shows the upgrade must verify (and re-sync) what those transactions touched.
        """
        self.logged_after_commit += 1
        self._spawn(self._append_late(tx))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Tasks start in the order they are created, and the log's writer keeps that order.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, log_id: int, tx: CapturedTransaction | None, committed: bool) -> None:
        try:
            await self.changelog.settle(log_id, committed=committed)
        except ChangeLogError as exc:
            # The record stays pending; recovery settles it from the source (txid_status) after a restart.
            log.error("database %s: change-log record %s could not be settled: %s", self.database, log_id, exc)
            return
        if committed and tx is not None:
            self.transactions += 1
            self.statements += len(tx.statements)

    async def _append_late(self, tx: CapturedTransaction) -> None:
        try:
            log_id = await self.changelog.prepare(tx)
            await self.changelog.settle(log_id, committed=True)
        except ChangeLogError as exc:
            self._lost(tx, exc)
            return
        self.transactions += 1
        self.statements += len(tx.statements)

    def _lost(self, tx: CapturedTransaction, why: object) -> None:
        # The client keeps working against the source (I5); the upgrade must re-copy what was lost.
        self.log_failures += 1
        log.error("database %s: a transaction (txid %s) could not be logged: %s", self.database, tx.txid, why)

    def report_unreplayable(self, session_id: int, what: str) -> None:
        """Note something a session did that replay cannot reproduce."""
        log.warning("database %s, session %s: %s cannot be replayed on the target", self.database, session_id, what)
        self.problems.append(CaptureProblem(session_id, what))

    async def drain(self) -> None:
        """Wait until every transaction handed to `record` has reached the log."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.changelog.flush()
