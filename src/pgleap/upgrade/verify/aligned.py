"""Running one read on the source and one on the target at the same logical point of the change stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from pgleap.upgrade.replay.applier import Replayer
from pgleap.upgrade.replay.point import PointMissedError, Work
from pgleap.upgrade.replay.snapshot import parse_snapshot

log = logging.getLogger(__name__)

SourceWork = Callable[[asyncpg.Connection], Awaitable[Any]]
HOLD_WAIT = 30.0  # seconds to wait for replay to hold (it finishes the batch it is applying first)


async def at_same_point(
    replayer: Replayer,
    source: asyncpg.Connection,
    source_work: SourceWork,
    target_work: Work,
    *,
    attempts: int = 5,
) -> tuple[Any, Any]:
    """(source_work's result, target_work's result), both read at one source snapshot (replay/point.py).

    `source` must be a connection to the source primary outside any transaction. The two works run at the
    same time (the target's may consume what the source's produces). A point replay could not honour is
    tried again with a new snapshot, up to `attempts` times; then PointMissedError.
    """
    for attempt in range(1, attempts + 1):
        request = replayer.request_point(target_work)
        try:
            # Inside the try: a caller cancelled while waiting must not leave replay holding for it.
            await request.wait_held(HOLD_WAIT)
            async with source.transaction(isolation="repeatable_read", readonly=True):
                snapshot = parse_snapshot(await source.fetchval("SELECT txid_current_snapshot()::text"))
                # Read after the snapshot: every COMMIT forwarded before it was taken is at or below this id.
                request.fix(snapshot, replayer.changelog.last_log_id())
                reading = asyncio.ensure_future(source_work(source))
                try:
                    await asyncio.wait({reading, request.result}, return_when=asyncio.FIRST_COMPLETED)
                    missed = not reading.done() and request.result.exception() is not None
                    source_result = None if missed else await reading
                finally:
                    # Missed point, or this task cancelled: the read must be over before the transaction ends,
                    # or its ROLLBACK meets a query still running on the connection.
                    reading.cancel()
                    cancelled = False
                    while not reading.done():
                        try:
                            await asyncio.wait({reading})
                        except asyncio.CancelledError:
                            cancelled = True  # this task's own: passed on once the read is over, never swallowed
                    if not reading.cancelled():
                        reading.exception()  # retrieved: the point's outcome says what went wrong
                    if cancelled:
                        raise asyncio.CancelledError
        except BaseException:
            request.cancel()
            raise
        try:
            return source_result, await request.wait()
        except asyncio.CancelledError:
            request.cancel()  # replay need not stop at this point for nobody
            raise
        except PointMissedError as exc:
            if attempt == attempts:
                raise
            log.info("reading %s at one point: %s; trying again (%d/%d)", replayer.database, exc, attempt, attempts)
    raise AssertionError("unreachable")
