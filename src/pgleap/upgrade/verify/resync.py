"""Re-sync: copy rows again from the source into the target, at one source point, while replay goes on.

At the point (replay/point.py) the target holds exactly the transactions the source snapshot sees, so
replacing the chosen rows there by the source's rows read under that snapshot leaves the target as if it
had never diverged: replay then applies the later transactions on top, in the same target transaction.
No row is lost (a row the source has is copied) and none is resurrected (a row the source lacks is
deleted). Rows go by their keys in batches; a table without a key, or a forced re-sync, is replaced
whole. The source's COPY streams into the target's COPY; nothing is held in memory.

Triggers and foreign keys on the target do not fire for re-synced rows (session_replication_role =
replica, as pg_restore --disable-triggers does): the rows are what the source holds, already. When the
target login may not set it, re-sync runs without it and says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg

from pgleap.upgrade.copy.model import Table
from pgleap.upgrade.replay.applier import Replayer
from pgleap.upgrade.replay.errors import TargetRefusedError
from pgleap.upgrade.replay.point import PointMissedError
from pgleap.upgrade.replay.wire import TargetSession
from pgleap.upgrade.verify import checksums as sql
from pgleap.upgrade.verify.aligned import at_same_point
from pgleap.upgrade.verify.checksums import Key

log = logging.getLogger(__name__)

KEYS_PER_POINT = 10000  # rows re-synced per point: one DELETE ... = ANY and one COPY
ATTEMPTS = 5  # points tried before giving up (each with a new snapshot)
_QUEUE_CHUNKS = 64  # COPY chunks buffered between source and target


@dataclass
class ResyncResult:
    """What one re-sync did."""

    database: str
    table: str
    whole_table: bool
    deleted: int = 0  # target rows removed
    copied: int = 0  # source rows written
    points: int = 0
    seconds: float = 0.0
    triggers_disabled: bool = True


class _Done:
    """End of the source's COPY stream."""


async def resync_keys(
    replayer: Replayer, source: asyncpg.Connection, table: Table, keys: Sequence[Key]
) -> ResyncResult:
    """Replace the target's rows with these keys by the source's (copied, or deleted where the source has none)."""
    result = ResyncResult(replayer.database, table.label, whole_table=False)
    started = time.monotonic()
    for start in range(0, len(keys), KEYS_PER_POINT):
        await _replace(replayer, source, table, sql.keys_predicate(table, keys[start : start + KEYS_PER_POINT]), result)
    result.seconds = time.monotonic() - started
    return result


async def resync_table(replayer: Replayer, source: asyncpg.Connection, table: Table) -> ResyncResult:
    """Replace every row of the table on the target by the source's, at one point."""
    result = ResyncResult(replayer.database, table.label, whole_table=True)
    started = time.monotonic()
    await _replace(replayer, source, table, "true", result)
    result.seconds = time.monotonic() - started
    return result


async def _replace(
    replayer: Replayer, source: asyncpg.Connection, table: Table, where: str, result: ResyncResult
) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            deleted, copied, replica = await _replace_at_point(replayer, source, table, where)
            break
        except PointMissedError:
            if attempt == ATTEMPTS:
                raise
    result.deleted += deleted
    result.copied += copied
    result.points += 1
    result.triggers_disabled = result.triggers_disabled and replica


async def _replace_at_point(
    replayer: Replayer, source: asyncpg.Connection, table: Table, where: str
) -> tuple[int, int, bool]:
    # One stream per point: a missed point's leftovers never reach the next one.
    queue: asyncio.Queue[bytes | BaseException | _Done] = asyncio.Queue(_QUEUE_CHUNKS)

    async def read_source(conn: asyncpg.Connection) -> None:
        async def put(chunk: bytes) -> None:
            await queue.put(bytes(chunk))

        try:
            await conn.copy_from_query(sql.rows_sql(table, where), output=put, format="text")
        except BaseException as exc:
            while not queue.empty():  # the target's COPY is aborted anyway: make room for the reason
                queue.get_nowait()
            queue.put_nowait(exc)
            raise
        await queue.put(_Done())

    async def write_target(session: TargetSession) -> tuple[int, int, bool]:
        replica = await _disable_triggers(session)
        deleted = _count(await session.execute(f"DELETE FROM ONLY {table.qualified} WHERE {where}"))
        copied = _count(await session.copy_in_stream(sql.copy_in_sql(table), _drain(queue)))
        if replica:
            await session.execute("SET LOCAL session_replication_role = origin")
        return deleted, copied, replica

    _, written = await at_same_point(replayer, source, read_source, write_target, attempts=1)
    return written  # type: ignore[no-any-return]


async def _drain(queue: asyncio.Queue[bytes | BaseException | _Done]) -> AsyncIterator[bytes]:
    while True:
        item = await queue.get()
        if isinstance(item, _Done):
            return
        if isinstance(item, BaseException):
            raise RuntimeError(f"reading the source failed: {item}") from item
        yield item


async def _disable_triggers(session: TargetSession) -> bool:
    # A savepoint, because a refused SET would otherwise abort replay's whole transaction.
    await session.query("SAVEPOINT pgleap_resync")
    try:
        await session.query("SET LOCAL session_replication_role = replica")
    except TargetRefusedError as exc:
        await session.query("ROLLBACK TO SAVEPOINT pgleap_resync")
        log.warning("re-sync: the target login may not disable triggers (%s); they fire for re-synced rows", exc)
        return False
    await session.query("RELEASE SAVEPOINT pgleap_resync")
    return True


def _count(tag: str) -> int:
    parts = tag.split()
    return int(parts[-1]) if parts and parts[-1].isdigit() else 0
