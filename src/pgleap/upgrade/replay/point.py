"""Reading the target at the same logical point as the source: the instant a source snapshot was taken.

Verification and re-sync compare the source, read under a snapshot V, with the target holding exactly the
transactions visible in V. Replay gets there without stopping for long:

1. `Replayer.request_point()` queues the request; once it is first in line, replay holds (applies nothing
   new) and says so (`PointRequest.wait_held`). The caller then opens a REPEATABLE READ transaction on the
   source, reads V = txid_current_snapshot() and then the log's last log id L.
   Every transaction replay applied before the hold had its COMMIT answered, so it is visible in V; every
   record prepared after L was forwarded after V was taken, so it is not.
2. `PointRequest.fix(V, L)` lets replay go on, applying only transactions visible in V, in commit order.
3. When the first transaction not visible in V comes up and every record up to L has settled (position
   P), replay opens one target transaction: the visible transactions up to P, then the caller's work (the
   target is now exactly at V), then the invisible ones up to P, the position P, COMMIT. Reordering the
   invisible ones after visible ones that followed them is safe: a transaction that waited for another's
   row lock cannot become visible before it (locks are released after the commit is visible).

Replay stays exactly-once throughout (the position still commits with the changes). A point that cannot be
honoured (held too long, a transaction in the way that replay must treat specially, an error) fails the
request with PointMissedError; the caller takes a new snapshot and asks again.

A second kind of point, `LogPoint`, is an instant seen from the proxy rather than a source snapshot: the
transactions prepared at or before a log id are visible, the later ones are not. Result comparison fixes
one (`PointRequest.fix_at`) the moment a sampled read's answer is complete, without holding replay first;
every record prepared after that moment has a higher log id, so replay cannot have applied one yet unless
an earlier request moved it on (the work then sees replay past the point and gives up).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pgleap.store.records import LoggedTransaction
from pgleap.upgrade.replay.errors import ReplayError
from pgleap.upgrade.replay.snapshot import Snapshot
from pgleap.upgrade.replay.wire import TargetSession

HOLD_TIMEOUT = 5.0  # seconds replay waits for the caller to take its source snapshot
POINT_TIMEOUT = 60.0  # seconds a fixed point may wait for replay to reach it

# The settings the work runs under, whatever the replayed transactions set before it (restored after it).
WORK_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}

Work = Callable[[TargetSession], Awaitable[Any]]


class PointMissedError(ReplayError):
    """Replay could not stop the target at the requested point; take a new source snapshot and ask again."""


@dataclass(frozen=True)
class SourcePoint:
    """An instant of the source: the snapshot V taken then, and the last log id prepared once V was taken."""

    snapshot: Snapshot
    last_log_id: int

    def visible(self, record: LoggedTransaction) -> bool:
        """Whether the source read under V sees this transaction."""
        if record.log_id > self.last_log_id:
            return False
        txid = record.transaction.txid
        # Without a txid (its probe was lost) the commit was answered before it was logged as committed;
        # treat it as visible, as replay applies it anyway (verification may then re-check its rows).
        return txid is None or self.snapshot.visible(txid)


@dataclass(frozen=True)
class LogPoint(SourcePoint):
    """An instant of the change log: the records prepared at or before `last_log_id` (`snapshot` is not used)."""

    def visible(self, record: LoggedTransaction) -> bool:
        """Whether the record was prepared at or before the point."""
        return record.log_id <= self.last_log_id


def log_point(last_log_id: int) -> LogPoint:
    """The LogPoint at `last_log_id`."""
    return LogPoint(Snapshot(1, 1, frozenset()), last_log_id)


class PointRequest:
    """One caller's wish to run `work` on the target at a source point, handed to a Replayer."""

    def __init__(self, work: Work, *, hold_timeout: float = HOLD_TIMEOUT, timeout: float = POINT_TIMEOUT) -> None:
        self.work = work
        self.point: SourcePoint | None = None
        self.hold_timeout = hold_timeout
        self.timeout = timeout
        self.held_at: float | None = None
        self.fixed_at: float | None = None
        self._held = asyncio.Event()
        self.result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        """Answered, failed or given up by the caller."""
        return self.result.done()

    def hold(self) -> None:
        """Replay has stopped applying for this request: the caller may take its source snapshot now."""
        if self.held_at is None:
            self.held_at = time.monotonic()
            self._held.set()

    async def wait_held(self, timeout: float) -> None:
        """Until replay holds for this request; PointMissedError when it does not within `timeout` seconds."""
        try:
            await asyncio.wait_for(asyncio.shield(self._held.wait()), timeout)
        except TimeoutError:
            self.cancel()
            raise PointMissedError(
                f"replay did not reach a point to hold at within {timeout:.0f}s (is it running, connected "
                f"and not paused? see SHOW REPLAY)"
            ) from None
        if self.result.done() and self.result.exception() is not None:
            await self.result

    def fix(self, snapshot: Snapshot, last_log_id: int) -> None:
        """The source point is taken: replay may go on, towards it."""
        self.point = SourcePoint(snapshot, last_log_id)
        self.fixed_at = time.monotonic()

    def fix_at(self, point: SourcePoint) -> None:
        """Fix a point the caller defined itself (a LogPoint), with or without replay holding first."""
        self.point = point
        self.fixed_at = time.monotonic()

    def cancel(self) -> None:
        """The caller gives up (its source snapshot failed): replay goes on as usual."""
        if not self.result.done():
            self.result.cancel()

    def overdue(self) -> str | None:
        """Why this request has waited too long, or None."""
        now = time.monotonic()
        if self.held_at is not None and self.fixed_at is None and now - self.held_at > self.hold_timeout:
            return f"the source snapshot was not given within {self.hold_timeout:.0f}s of holding replay"
        if self.fixed_at is not None and now - self.fixed_at > self.timeout:
            return f"replay did not reach the source point within {self.timeout:.0f}s"
        return None

    def fail(self, reason: str) -> None:
        """Give the caller PointMissedError with `reason`."""
        if not self.result.done():
            self.result.set_exception(PointMissedError(reason))

    def answer(self, value: Any) -> None:
        """Give the caller what its work returned."""
        if not self.result.done():
            self.result.set_result(value)

    async def wait(self) -> Any:
        """What the work returned at the point; PointMissedError when it could not be run there."""
        return await self.result
