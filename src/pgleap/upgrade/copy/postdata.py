"""Each table's indexes and keys, then its ANALYZE, built as soon as its data is in, while other tables copy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from pgleap.config import ServerConfig
from pgleap.store import StateStore
from pgleap.upgrade.copy.connect import connect
from pgleap.upgrade.copy.model import Table
from pgleap.upgrade.copy.plan import BLOCK_SIZE
from pgleap.upgrade.copy.toc import PostDataPlan

log = logging.getLogger(__name__)

# A table this big gets one session per index or key, so that its primary key builds alongside its
# other indexes (as pg_restore -j does); smaller tables take one pg_restore for all of theirs.
OWN_SESSION_BYTES = 64 * 1024 * 1024

# Restores some TOC lines of the dump on the target and applies on_schema_error to what it rejects.
RestoreFn = Callable[[list[str], str, bool], Awaitable[None]]


def keys_step(table: Table) -> str:
    """The store's step name for a table's own indexes and keys."""
    return f"post_data {table.label}"


def analyze_step(label: str) -> str:
    """The store's step name for one table's ANALYZE."""
    return f"analyze {label}"


@dataclass
class _Job:
    table: Table
    lines: list[str]
    rerun: bool


class TablePostData:
    """A pool of target sessions: per finished table, its key builds (in parallel), then ANALYZE."""

    def __init__(
        self,
        store: StateStore,
        database: str,
        target: ServerConfig,
        plan: PostDataPlan,
        restore: RestoreFn,
        *,
        workers: int,
        analyze: bool,
    ) -> None:
        self.store = store
        self.database = database
        self.target = target
        self.plan = plan
        self.restore = restore
        self.analyze = analyze
        self.handled: set[int] = set()  # oids of tables whose keys this pool builds (or built before)
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._left: dict[int, int] = {}  # table oid -> its jobs not finished yet
        self._error: BaseException | None = None
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(max(1, workers))]

    def table_done(self, table: Table) -> None:
        """All of `table`'s rows are on the target: queue its key builds and ANALYZE."""
        if table.oid in self.handled:
            return
        self.handled.add(table.oid)
        status = self.store.step_status(self.database, keys_step(table))
        if status == "done":
            return
        self.store.mark_step(self.database, keys_step(table), "started")
        rerun = status == "started"
        lines = [e.line for e in self.plan.entries_for(table.oid)]
        if table.pages * BLOCK_SIZE >= OWN_SESSION_BYTES:
            groups = [[line] for line in lines]
        else:
            groups = [lines] if lines else []
        if not groups:
            groups = [[]]  # no keys of its own: only ANALYZE
        self._left[table.oid] = len(groups)
        for group in groups:
            self._queue.put_nowait(_Job(table, group, rerun))

    async def _worker(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while (job := await self._queue.get()) is not None:
                if self._error is not None:
                    continue  # a failure stops the copy: leave the rest for the rerun
                try:
                    conn = await self._run(job, conn)
                except Exception as exc:
                    self._error = exc
        finally:
            if conn is not None:
                await conn.close()

    async def _run(self, job: _Job, conn: asyncpg.Connection | None) -> asyncpg.Connection | None:
        if job.lines:
            await self.restore(job.lines, f"the keys of {job.table.label}", job.rerun)
        self._left[job.table.oid] -= 1
        if self._left[job.table.oid]:
            return conn
        # The last of the table's builds: now its statistics, so that expression indexes get theirs
        # too. An inheritance parent waits for the final pass: its ANALYZE also samples its children.
        if self.analyze and not job.table.has_children:
            conn = conn or await connect(self.target, role="target")
            await conn.execute(f"ANALYZE {job.table.qualified}")
            self.store.mark_step(self.database, analyze_step(job.table.label), "done")
        self.store.mark_step(self.database, keys_step(job.table), "done")
        return conn

    async def finish(self) -> None:
        """Wait for every queued table; raises the first failure."""
        for _ in self._tasks:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._tasks)
        if self._error is not None:
            raise self._error

    async def cancel(self) -> None:
        """Stop the pool (after another step failed); running pg_restore processes are killed."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
