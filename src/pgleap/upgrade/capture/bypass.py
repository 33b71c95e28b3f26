"""Detecting writes that bypass pgleap: sessions on the source that write and are not pgleap's own.

Capture only sees what goes through the proxy. A session connected straight to the source (a cron
job, a DBA's psql, an application instance not yet pointed at pgleap) writes rows the change log never
receives, so the target silently misses them. pgleap cannot capture those writes, but it can see them:
every few seconds the monitor asks the source which sessions of the database hold a transaction id,
and reports each one that is not a server connection of pgleap's as an upgrade risk.

A poll sees only transactions open at that instant, so a short write between two polls can be missed:
this is a warning light, not proof of absence; verification is what proves the tables equal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from pgleap.config import ServerConfig
from pgleap.upgrade.compat.activity import writing_sessions_sql
from pgleap.upgrade.compat.facts import facts_for
from pgleap.upgrade.copy.connect import connect, version_num

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgleap_bypass_monitor"
# Connections pgleap's engine opens on the source name themselves so; they are not bypassing writers.
ENGINE_APPLICATION_PREFIX = "pgleap_"


@dataclass
class BypassWriter:
    """One distinct session seen writing on the source outside pgleap."""

    client_addr: str | None  # None: a unix-socket connection
    client_port: int | None  # None (or -1 on the server): a unix-socket connection
    usename: str | None
    application_name: str
    pid: int  # the backend pid when last seen
    first_seen: float
    last_seen: float
    times_seen: int = 1

    @property
    def key(self) -> tuple[str | None, int | None, str | None, str]:
        """What makes two sightings the same writer."""
        return (self.client_addr, self.client_port, self.usename, self.application_name)

    def address(self) -> str:
        """host:port, or "local" for a unix socket."""
        if self.client_addr is None:
            return "local"
        return f"{self.client_addr}:{self.client_port}"


class BypassMonitor:
    """Polls the source of one database for writing sessions that are not pgleap's."""

    def __init__(
        self,
        database: str,
        source: ServerConfig,
        own_pids: Callable[[], set[int]],
        interval: float = 5.0,
    ) -> None:
        self.database = database
        self.source = source
        self.own_pids = own_pids  # backend pids of pgleap's server connections to `source`, now
        self.interval = interval
        self.writers: dict[tuple[str | None, int | None, str | None, str], BypassWriter] = {}
        self.polls = 0
        self.last_poll_at: float | None = None
        self.last_error: str | None = None
        self._conn: asyncpg.Connection | None = None
        self._sql = ""
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def running(self) -> bool:
        """Whether the polling task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling in the running event loop (again after `stop`, keeping what was seen)."""
        if self.running:
            return
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"bypass-monitor:{self.database}")

    def stop(self) -> None:
        """Stop polling; the connection closes as the task ends."""
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def wait_stopped(self) -> None:
        """Return once the polling task has ended."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def active(self, writer: BypassWriter) -> bool:
        """Whether `writer` was writing at the last poll."""
        return self.last_poll_at is not None and writer.last_seen >= self.last_poll_at

    def addresses(self, limit: int = 3) -> str:
        """A short text of the writers' addresses, newest first, for status lines."""
        writers = sorted(self.writers.values(), key=lambda w: w.last_seen, reverse=True)
        text = ", ".join(w.address() for w in writers[:limit])
        more = len(writers) - limit
        return f"{text} (+{more} more)" if more > 0 else text

    async def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    await self.poll()
                except Exception as exc:  # any failure: say so in status and the log, and keep looking
                    self._failed(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)
        finally:
            self._close()

    async def poll(self) -> list[BypassWriter]:
        """Look once; returns the writers seen in this poll (and records them)."""
        if self._conn is None or self._conn.is_closed():
            await self._connect()
        assert self._conn is not None
        # pgleap's pids before and after the query: a session that closes while the query runs still counts.
        before = self.own_pids()
        rows = await self._conn.fetch(self._sql)
        own = before | self.own_pids()
        now = time.time()
        seen = []
        for pid, addr, port, usename, application_name in rows:
            name = application_name or ""
            if pid in own or name.startswith(ENGINE_APPLICATION_PREFIX):
                continue
            seen.append(self._record(pid, addr, None if port is None or port < 0 else port, usename, name, now))
        self.polls += 1
        self.last_poll_at = now
        self.last_error = None
        return seen

    def _record(
        self, pid: int, addr: str | None, port: int | None, usename: str | None, name: str, now: float
    ) -> BypassWriter:
        key = (addr, port, usename, name)
        writer = self.writers.get(key)
        if writer is not None:
            writer.last_seen, writer.pid = now, pid
            writer.times_seen += 1
            return writer
        writer = BypassWriter(addr, port, usename, name, pid, now, now)
        self.writers[key] = writer
        log.warning(
            "database %s: session %s (user %s, application %r, pid %d) writes to the source without going "
            "through pgleap; its writes are not captured and will be missing on the target: point it at "
            "pgleap, or re-sync the tables it writes",
            self.database,
            writer.address(),
            usename,
            name,
            pid,
        )
        return writer

    async def _connect(self) -> None:
        self._conn = await connect(self.source, role="source", settings={"application_name": APPLICATION_NAME})
        self._sql = writing_sessions_sql(facts_for(await version_num(self._conn)))

    def _failed(self, exc: BaseException) -> None:
        message = f"cannot look for writers bypassing pgleap on {self.source.describe()}: {exc}"
        if message != self.last_error:
            log.warning("database %s: %s; trying again every %.0fs", self.database, message, self.interval)
        self.last_error = message
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Also runs when the loop is torn down under the task, with the transport already gone.
            with contextlib.suppress(Exception):
                conn.terminate()
