"""Capture of one database: where its sessions' committed transactions go, and what went wrong."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pgleap.proxy.stats import LatencyHistogram
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
    # How long each held COMMIT waited for its record to become durable: what capture adds to a COMMIT.
    commit_hold: LatencyHistogram = field(default_factory=LatencyHistogram)
    _late: set[asyncio.Future[None]] = field(default_factory=set)  # late appends not in the log yet

    def prepare_then(self, tx: CapturedTransaction, go_on: Callable[[int | None], None]) -> HeldCommit:
        """Durably log `tx` as pending, then call `go_on(log_id)` to let its COMMIT go to the source.

        `go_on(None)` when the log cannot take it within PREPARE_TIMEOUT. Called back in the event loop straight
        from the log's writer: the held COMMIT waits for the disk, not for the loop's turns. After a timeout the
        record may still land: the caller then tells the returned HeldCommit what became of the COMMIT.
        """
        return HeldCommit(self, tx, go_on)

    def settle(self, log_id: int, tx: CapturedTransaction | None, committed: bool) -> None:
        """The source answered the COMMIT of the record `log_id` prepared: mark it committed or aborted."""
        try:
            self.changelog.settle_nowait(log_id, committed=committed)
        except ChangeLogError as exc:
            # The record stays pending; recovery settles it from the source (txid_status) after a restart.
            log.error("database %s: change-log record %s could not be settled: %s", self.database, log_id, exc)
            return
        if committed and tx is not None:
            self.transactions += 1
            self.statements += len(tx.statements)

    def record_late(self, tx: CapturedTransaction) -> None:
        """Log a committed transaction whose COMMIT could not be held (it sat inside one query string).

        A crash between the source's answer and this append loses it from the log: it is counted,
        so that status shows the upgrade must verify (and re-sync) what those transactions touched.
        """
        self.logged_after_commit += 1
        appended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._late.add(appended)
        appended.add_done_callback(self._late.discard)

        def logged(log_id: int | None, error: ChangeLogError | None) -> None:
            if log_id is None:
                self._lost(tx, error)
            else:
                self.settle(log_id, tx, committed=True)
            appended.set_result(None)

        # Queued now, in order with the COMMITs held after this answer: they committed after it.
        self.changelog.prepare_then(tx, logged)

    def _lost(self, tx: CapturedTransaction, why: object) -> None:
        # The client keeps working against the source (I5); the upgrade must re-copy what was lost.
        self.log_failures += 1
        log.error("database %s: a transaction (txid %s) could not be logged: %s", self.database, tx.txid, why)

    def report_unreplayable(self, session_id: int, what: str) -> None:
        """Note something a session did that replay cannot reproduce."""
        log.warning("database %s, session %s: %s cannot be replayed on the target", self.database, session_id, what)
        self.problems.append(CaptureProblem(session_id, what))

    async def drain(self) -> None:
        """Wait until every transaction handed to `record_late` has reached the log."""
        while self._late:
            await asyncio.gather(*list(self._late), return_exceptions=True)
        await self.changelog.flush()


class HeldCommit:
    """One prepare on the commit path: the log's answer or the timeout, whichever comes first, lets the COMMIT go.

    After a timeout the COMMIT goes without its record, which may land later. That record is then the
    transaction's only one (it is never logged again after the answer, which a crash in between would leave
    as two pending records of one txid, both committed): it is settled by the answer (`answered`), or from
    the source if the client leaves first (`orphaned`). A record that never lands falls back to `record_late`.
    """

    __slots__ = ("capture", "go_on", "held_at", "landed", "log_id", "outcome", "timer", "tx")

    def __init__(self, capture: Capture, tx: CapturedTransaction, go_on: Callable[[int | None], None]) -> None:
        self.capture = capture
        self.tx = tx
        self.go_on: Callable[[int | None], None] | None = go_on
        self.landed = False  # the log has answered (with an id or an error)
        self.log_id: int | None = None
        # After a timeout: True/False once the source answered the COMMIT; a settler when the client left.
        self.outcome: bool | Callable[[int, CapturedTransaction], None] | None = None
        loop = asyncio.get_running_loop()
        # perf_counter, not loop.time(): uvloop's clock moves in whole milliseconds, and holds are often less.
        self.held_at = time.perf_counter()
        self.timer = loop.call_later(PREPARE_TIMEOUT, self._timed_out)
        capture.changelog.prepare_then(tx, self._logged)

    @property
    def timed_out(self) -> bool:
        """Whether the COMMIT was let go before the log answered (its record may still land)."""
        return self.go_on is None and not self.landed

    def answered(self, committed: bool) -> None:
        """The source answered the COMMIT that went on without this record."""
        self.outcome = committed
        self._settle_late()

    def orphaned(self, settle: Callable[[int, CapturedTransaction], None]) -> None:
        """The COMMIT went out but its answer will never be read: `settle` asks the source, once the record lands."""
        self.outcome = settle
        self._settle_late()

    def _logged(self, log_id: int | None, error: ChangeLogError | None) -> None:
        self.landed, self.log_id = True, log_id
        if self.go_on is None:
            self._settle_late()
            return
        self.timer.cancel()
        if log_id is None:
            self.capture._lost(self.tx, error)
        self._release(log_id)

    def _settle_late(self) -> None:
        outcome = self.outcome
        if not self.landed or outcome is None:
            return
        self.outcome = None  # once
        if self.log_id is None:
            if outcome is True:
                self.capture.record_late(self.tx)  # the record never made it: log it after the answer, as before
        elif callable(outcome):
            outcome(self.log_id, self.tx)
        else:
            self.capture.settle(self.log_id, self.tx, committed=outcome)

    def _timed_out(self) -> None:
        if self.go_on is not None:
            self.capture._lost(self.tx, f"no answer within {PREPARE_TIMEOUT:g} s")
            self._release(None)

    def _release(self, log_id: int | None) -> None:
        """Let the COMMIT go (once), counting how long it was held."""
        go_on, self.go_on = self.go_on, None
        assert go_on is not None
        self.capture.commit_hold.observe(time.perf_counter() - self.held_at)
        go_on(log_id)
