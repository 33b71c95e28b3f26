"""The data step: plan chunks once, settle chunks a crash left in flight, copy the rest in parallel."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import asyncpg

from pgleap.config import ServerConfig
from pgleap.store import ChunkRecord, StateStore
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.compat import facts_for
from pgleap.upgrade.copy.connect import connect, version_num
from pgleap.upgrade.copy.errors import CopyError
from pgleap.upgrade.copy.model import CopyOptions, Table
from pgleap.upgrade.copy.plan import load_tables, plan_chunks
from pgleap.upgrade.copy.progress import LiveCounters
from pgleap.upgrade.copy.readside import PrimaryReadSide, ReadSide, ReplicaReadSide
from pgleap.upgrade.copy.worker import copy_chunk

log = logging.getLogger(__name__)

_SETTLE_TIMEOUT = 30.0


async def settle_inflight(store: StateStore, database: str, target: ServerConfig) -> None:
    """Decide, for each chunk a crash left in flight, whether its target transaction committed."""
    inflight = [c for c in store.chunks(database) if c.status == "inflight"]
    if not inflight:
        return
    conn = await connect(target, role="target")
    try:
        facts = facts_for(await version_num(conn))
        for chunk in inflight:
            assert chunk.target_txid is not None
            status = await _txid_status(conn, facts.txid_status_sql(), facts.backend_of_xid_sql(), chunk.target_txid)
            if status == "committed":
                log.info("chunk %s committed on the target before the crash; kept", chunk.chunk_id)
                store.mark_chunk_done(database, chunk.chunk_id, chunk.rows, chunk.bytes, chunk.seconds)
            elif status == "aborted":
                log.info("chunk %s was rolled back on the target by the crash; copying it again", chunk.chunk_id)
                store.mark_chunk_pending(database, chunk.chunk_id)
            else:
                raise CopyError(
                    f"cannot tell whether target transaction {chunk.target_txid} of chunk "
                    f"{chunk.chunk_id} committed (txid_status: {status}); start the copy over with "
                    f"--restart"
                )
    finally:
        await conn.close()


async def _txid_status(conn: asyncpg.Connection, status_sql: str, backend_sql: str, txid: int) -> str | None:
    # A backend whose client was killed may not have noticed yet: end it, then its transaction aborts.
    deadline = asyncio.get_running_loop().time() + _SETTLE_TIMEOUT
    while True:
        status = await conn.fetchval(status_sql, txid)
        if status != "in progress" or asyncio.get_running_loop().time() > deadline:
            return None if status is None else str(status)
        for row in await conn.fetch(backend_sql, txid):
            await conn.execute("SELECT pg_terminate_backend($1)", row[0])
        await asyncio.sleep(0.1)


class DataCopy:
    """Copies every chunk of one run with `parallel_workers` pairs of sessions."""

    def __init__(
        self,
        store: StateStore,
        database: str,
        read_side: ReadSide,
        source: ServerConfig,
        target: ServerConfig,
        options: CopyOptions,
        live: LiveCounters,
        on_table_done: Callable[[Table], None] | None = None,
    ) -> None:
        self.store = store
        self.database = database
        self.read_side = read_side
        self.source = source
        self.target = target
        self.options = options
        self.live = live
        self._primary_side: PrimaryReadSide | None = None
        self._primary_lock = asyncio.Lock()
        # Called once all of a table's chunks are committed: its indexes can be built right away.
        self.on_table_done = on_table_done
        self._chunks_left: Counter[str] = Counter()

    async def run(self) -> None:
        """Plan (first run only), settle in-flight chunks, copy the pending ones."""
        planner = await self.read_side.session()
        try:
            tables = {
                t.label: t for t in await load_tables(planner, self.read_side.facts, allow_binary=self.options.binary)
            }
            if not self.store.chunks(self.database):
                self.store.add_chunks(
                    self.database, await plan_chunks(planner, self.read_side.facts, list(tables.values()), self.options)
                )
        finally:
            await planner.close()
        await settle_inflight(self.store, self.database, self.target)
        chunks = self.store.chunks(self.database)
        pending = [c for c in chunks if c.status == "pending"]
        self._chunks_left = Counter(f"{c.schema_name}.{c.table_name}" for c in pending)
        for label in dict.fromkeys(f"{c.schema_name}.{c.table_name}" for c in chunks):
            if not self._chunks_left[label] and label in tables:
                self._table_done(tables[label])
        if not pending:
            return
        try:
            await self._copy_all(pending, tables)
        finally:
            if self._primary_side is not None:
                await self._primary_side.close(success=True)

    def _table_done(self, table: Table) -> None:
        if self.on_table_done is not None:
            self.on_table_done(table)

    async def _side_for(self, table: Table) -> tuple[ReadSide, str | None]:
        # A standby cannot read unlogged tables (they are not WAL-logged): read them on the primary
        # with a snapshot of their own, stored on their chunks for the change-log stitch.
        if not table.unlogged or not isinstance(self.read_side, ReplicaReadSide):
            return self.read_side, None
        async with self._primary_lock:
            if self._primary_side is None:
                side = PrimaryReadSide(self.source)
                await side.take()
                self._primary_side = side
        return self._primary_side, self._primary_side.snapshot

    async def _copy_all(self, pending: list[ChunkRecord], tables: dict[str, Table]) -> None:
        queue: asyncio.Queue[ChunkRecord] = asyncio.Queue()
        for chunk in pending:
            queue.put_nowait(chunk)
        workers = [
            asyncio.create_task(self._worker(queue, tables))
            for _ in range(min(self.options.parallel_workers, len(pending)))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise

    async def _worker(self, queue: asyncio.Queue[ChunkRecord], tables: dict[str, Table]) -> None:
        sessions: dict[int, asyncpg.Connection] = {}
        target = await connect(self.target, role="target", settings=sql.session_settings(facts_for(100000)))
        try:
            while not queue.empty():
                chunk = queue.get_nowait()
                table = tables.get(f"{chunk.schema_name}.{chunk.table_name}")
                if table is None:
                    raise CopyError(
                        f"table {chunk.schema_name}.{chunk.table_name} of the copy plan is no longer "
                        f"visible at S; start the copy over with --restart"
                    )
                side, snapshot = await self._side_for(table)
                if id(side) not in sessions:
                    sessions[id(side)] = await side.session()
                await copy_chunk(
                    self.store, self.database, sessions[id(side)], target, table, chunk, self.live, snapshot
                )
                self._chunks_left[table.label] -= 1
                if not self._chunks_left[table.label]:
                    self._table_done(table)
        finally:
            for conn in [*sessions.values(), target]:
                await conn.close()
