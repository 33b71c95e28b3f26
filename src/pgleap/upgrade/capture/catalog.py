"""The source's tables as row images need them, loaded from its catalog and kept fresh across DDL.

Capture appends a RETURNING clause to an INSERT only when the table is known to take it without
changing what the client sees: an ordinary or partitioned table, no rules, no row security, the
login may SELECT it.

The catalog is a snapshot; DDL makes it stale. From the moment a session sends DDL until a load
taken after its transaction ended has arrived, the tables it may reshape are stale: those it names,
with their inheritance children and partitions, or every table for DDL that cannot be pinned down
(DROP SCHEMA, say). An INSERT into a stale table waits for the fresh load; the DDL's own lock on the
source would hold it as long. Inside the DDL's own transaction, or past the wait, it goes out
unchanged and is replayed as a statement. So a dropped or renamed column can never make a client's
INSERT fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg

from pgleap.config import ServerConfig
from pgleap.tasks import cancel_until_done
from pgleap.upgrade.compat.facts import PG12, facts_for
from pgleap.upgrade.compat.images import image_columns_sql, image_inherits_sql, image_readers_sql
from pgleap.upgrade.copy.connect import connect, version_num

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgleap_capture_catalog"
_FLOATS = frozenset(("float4", "float8"))


@dataclass(frozen=True)
class ImageColumn:
    """A column a row image carries."""

    name: str
    float_send: str | None = None  # "float4" or "float8": returned through floatNsend, exact on every major


@dataclass(frozen=True)
class TableShape:
    """One source table as capture sees it."""

    schema: str
    name: str
    columns: tuple[ImageColumn, ...]  # insertable columns, in order (no generated ones)
    visible_columns: int  # what `*` expands to, generated columns included
    key: tuple[str, ...]  # primary key columns, () without one
    identity_always: bool  # a GENERATED ALWAYS identity column: replay needs OVERRIDING SYSTEM VALUE
    readers: frozenset[str]
    unsafe: str | None = None  # why row images cannot be used for it, None when they can


# Names a DDL statement may reshape: a set of table names, or ALL when it cannot be told.
Reshaped = set[str] | None
ALL: Reshaped = None


class SourceCatalog:
    """What capture knows of one source database's tables, refreshed after DDL and every `interval`."""

    def __init__(self, database: str, source: ServerConfig, interval: float = 30.0) -> None:
        self.database = database  # the name clients use, for messages; the source's own name is in `source`
        self.source = source
        self.interval = interval
        self.tables: dict[tuple[str, str], TableShape] = {}
        self.loaded = False
        self.last_error: str | None = None
        self._by_name: dict[str, list[TableShape]] = {}
        self._children: dict[str, set[str]] = {}  # table name -> names of its inheritance children, partitions
        self._open: dict[int, Reshaped] = {}  # sessions inside a transaction that sent DDL
        self._ended: list[tuple[int, Reshaped]] = []  # (generation, names) of DDL transactions not yet reloaded
        self._generation = 0  # bumped when a DDL transaction ends
        self._fresh = asyncio.Event()  # set while nothing is stale
        self._stopped = asyncio.Event()  # set while no task refreshes it
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        """Whether statements may be rewritten at all (the first load has arrived)."""
        return self.loaded

    def resolve(self, schema: str | None, name: str) -> TableShape | None:
        """The table a written name refers to; None when unknown, stale, or ambiguous without the search_path."""
        if self.is_stale(name):
            return None
        if schema is not None:
            return self.tables.get((schema, name))
        found = self._by_name.get(name, [])
        return found[0] if len(found) == 1 else None

    def is_stale(self, name: str) -> bool:
        """Whether DDL may have reshaped tables called `name` since the catalog was read (or it never was)."""
        if not self.loaded:
            return True
        sets = [*self._open.values(), *(names for _, names in self._ended)]
        return any(names is None or name in names for names in sets)

    def in_ddl(self, session_id: int) -> bool:
        """Whether this session's open transaction sent DDL (waiting for a reload would wait for itself)."""
        return session_id in self._open

    def ddl_started(self, session_id: int, tables: tuple[str, ...] | None) -> None:
        """A session sent DDL that may reshape `tables` (None: any): leave them alone until a fresh load."""
        held = self._open.get(session_id, set())
        if tables is None or held is None:
            self._open[session_id] = ALL
        else:
            names = set(tables)
            for table in tables:
                names |= self._descendants(table)
            self._open[session_id] = held | names
        self._fresh.clear()

    def transaction_ended(self, session_id: int) -> None:
        """A session's transaction ended: if it sent DDL, read the catalog again."""
        if session_id in self._open:
            self._generation += 1
            self._ended.append((self._generation, self._open.pop(session_id)))
            self._wake.set()

    async def wait_fresh(self, timeout: float) -> bool:
        """Wait until nothing is stale (at most `timeout` seconds, and no longer than refreshing goes on)."""
        waits = [asyncio.ensure_future(self._fresh.wait()), asyncio.ensure_future(self._stopped.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._fresh.is_set()

    def start(self) -> None:
        """Keep the catalog loaded in the background."""
        if self._task is None or self._task.done():
            self._stopped.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"catalog-{self.database}")

    async def stop(self) -> None:
        """Stop refreshing, waiting until the refresh task has ended (a load in flight is abandoned).

        Whoever waits for a fresh catalog goes on at once, since nothing will refresh it now: an INSERT held
        for it (at STOP CAPTURE, or at cutover) gets no row images for a stale table, as after a timeout.
        """
        self._stopped.set()
        task, self._task = self._task, None
        if task is not None:
            await cancel_until_done(task, 1.0)  # its wait_for may lose a cancellation (pgleap/tasks.py)

    async def load_once(self) -> bool:
        """Load now; False (with `last_error`) when the source could not be read."""
        generation = self._generation  # DDL transactions that ended before this are in what it reads
        try:
            conn = await connect(self.source, role="source", settings={"application_name": APPLICATION_NAME})
        except Exception as exc:  # an unreachable source must not stop capture: images wait, statements replay
            self.last_error = str(exc)
            return False
        try:
            facts = facts_for(await version_num(conn))
            columns = await conn.fetch(image_columns_sql(facts))
            readers = await conn.fetch(image_readers_sql())
            inherits = await conn.fetch(image_inherits_sql())
        except Exception as exc:
            self.last_error = str(exc)
            return False
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
        self._install(_shapes(columns, readers, exact_floats=facts.version_num >= PG12), inherits, generation)
        self.last_error = None
        return True

    def _install(
        self, tables: dict[tuple[str, str], TableShape], inherits: list[asyncpg.Record], generation: int
    ) -> None:
        by_name: dict[str, list[TableShape]] = {}
        for shape in tables.values():
            by_name.setdefault(shape.name, []).append(shape)
        children: dict[str, set[str]] = {}
        for parent, child in inherits:
            children.setdefault(parent, set()).add(child)
        self.tables, self._by_name, self._children, self.loaded = tables, by_name, children, True
        # DDL that ended before the load began is in it; DDL still open, or ended since, stays stale.
        self._ended = [(g, names) for g, names in self._ended if g > generation]
        if not self._open and not self._ended:
            self._fresh.set()

    def _descendants(self, table: str) -> set[str]:
        found: set[str] = set()
        todo = [table]
        while todo:
            for child in self._children.get(todo.pop(), ()):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    async def _run(self) -> None:
        while True:
            ok = await self.load_once()
            if not ok and self.last_error is not None:
                log.warning(
                    "database %s: cannot read the source catalog for row images: %s", self.database, self.last_error
                )
            delay = self.interval if ok else 1.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)


def _shapes(
    columns: list[asyncpg.Record], readers: list[asyncpg.Record], *, exact_floats: bool
) -> dict[tuple[str, str], TableShape]:
    allowed: dict[tuple[str, str], set[str]] = {}
    for schema, table, role in readers:
        allowed.setdefault((schema, table), set()).add(role)
    grouped: dict[tuple[str, str], list[asyncpg.Record]] = {}
    for row in columns:
        grouped.setdefault((row[0], row[1]), []).append(row)
    shapes = {}
    for key, rows in grouped.items():
        has_rules, row_security = rows[0][2], rows[0][3]
        image: list[ImageColumn] = []
        unsafe = "it has rules" if has_rules else "it has row security" if row_security else None
        for _s, _t, _r, _rls, name, generated, _identity, base, typtype, element, _key in rows:
            if generated:
                continue
            if not exact_floats and (typtype == "c" or element in _FLOATS):
                # Text output of floats inside arrays or composites is rounded before 12: not exact.
                unsafe = unsafe or f"column {name} holds floats a pre-12 source prints rounded"
            image.append(ImageColumn(name, base if base in _FLOATS else None))
        shapes[key] = TableShape(
            schema=key[0],
            name=key[1],
            columns=tuple(image),
            visible_columns=len(rows),
            key=tuple(r[4] for r in rows if r[10]),
            identity_always=any(r[6] for r in rows),
            readers=frozenset(allowed.get(key, ())),
            unsafe=unsafe,
        )
    return shapes
