"""Copy one chunk: stream COPY out of the read side into COPY in on the target, in one target transaction."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg

from pgleap.store import ChunkRecord, StateStore
from pgleap.upgrade.copy.connect import quote_ident
from pgleap.upgrade.copy.model import Table
from pgleap.upgrade.copy.plan import chunk_predicate
from pgleap.upgrade.copy.progress import LiveCounters

_QUEUE_DEPTH = 16  # COPY data messages buffered between the two sides (each up to ~64 kB)


def source_query(table: Table, chunk: ChunkRecord) -> str:
    """SELECT of a chunk's rows; FROM ONLY so an inheritance parent does not also yield its children's rows."""
    columns = ", ".join(quote_ident(c.name) for c in table.columns)
    predicate = chunk_predicate(table, chunk)
    where = f" WHERE {predicate}" if predicate else ""
    return f"SELECT {columns} FROM ONLY {table.qualified}{where}"


async def _pipe(
    source: asyncpg.Connection, target: asyncpg.Connection, table: Table, chunk: ChunkRecord, live: LiveCounters
) -> tuple[int, int]:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_QUEUE_DEPTH)
    fmt = "binary" if table.binary else "text"
    nbytes = 0

    async def sink(data: bytes) -> None:
        nonlocal nbytes
        nbytes += len(data)
        live.add(chunk.chunk_id, len(data))
        await queue.put(data)

    async def produce() -> None:
        try:
            if chunk.kind == "table" and not table.has_children:
                # COPY table TO never includes child tables, and skips the executor's projection.
                await source.copy_from_table(
                    table.name,
                    schema_name=table.schema,
                    output=sink,
                    format=fmt,
                    columns=[c.name for c in table.columns],
                )
            else:
                await source.copy_from_query(source_query(table, chunk), output=sink, format=fmt)
        finally:
            await queue.put(None)

    async def feed() -> AsyncIterator[bytes]:
        while (data := await queue.get()) is not None:
            yield data

    producer = asyncio.create_task(produce())
    try:
        status = await target.copy_to_table(
            table.name, schema_name=table.schema, source=feed(), format=fmt, columns=[c.name for c in table.columns]
        )
    except BaseException:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        raise
    await producer  # re-raises a source-side error
    return int(status.split()[-1]), nbytes


async def copy_chunk(
    store: StateStore,
    database: str,
    source: asyncpg.Connection,
    target: asyncpg.Connection,
    table: Table,
    chunk: ChunkRecord,
    live: LiveCounters,
    snapshot: str | None = None,
) -> int:
    """Copy a chunk in one target transaction; marks it done in the store only after the commit. Returns rows."""
    started = time.monotonic()
    tx = target.transaction()
    await tx.start()
    try:
        txid = int(await target.fetchval("SELECT txid_current()"))
        # Recorded before the commit: after a crash, txid_status(txid) on the target says whether
        # this chunk's rows are there (committed) or not (rolled back), so it is never copied twice.
        store.mark_chunk_inflight(database, chunk.chunk_id, txid, snapshot)
        rows, nbytes = await _pipe(source, target, table, chunk, live)
        store.mark_chunk_inflight_counts(database, chunk.chunk_id, rows, nbytes, time.monotonic() - started)
    except BaseException:
        live.finish(chunk.chunk_id)
        await asyncio.shield(_rollback(tx))
        store.mark_chunk_pending(database, chunk.chunk_id)
        raise
    await tx.commit()
    live.finish(chunk.chunk_id)
    store.mark_chunk_done(database, chunk.chunk_id, rows, nbytes, time.monotonic() - started)
    return rows


async def _rollback(tx: asyncpg.transaction.Transaction) -> None:
    # If the connection is gone, the server rolls the transaction back itself.
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        await tx.rollback()
