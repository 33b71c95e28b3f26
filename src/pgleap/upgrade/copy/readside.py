"""Where table data is read from at the snapshot S: a paused replica (Bob) or the primary (Alice)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from pgleap.config import ServerConfig
from pgleap.store import CopyRun
from pgleap.upgrade.compat import Facts, facts_for
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.copy.connect import connect, quote_literal, version_num
from pgleap.upgrade.copy.errors import CopyError, SnapshotLostError

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 60.0
# Before 10, how long to keep pausing a standby's replay until it stops where no transaction is in progress.
QUIET_TIMEOUT = 60.0
_QUIET_RETRY = 0.2
_STABLE_POLLS = 3  # replay position unchanged over this many polls = pause reached (before 14)
_POLL_INTERVAL = 0.05


@dataclass
class SnapshotInfo:
    """S and what identifies the paused replica state it was taken in."""

    snapshot: str
    lsn: str | None = None
    replica_start: str | None = None


class ReadSide:
    """Opens reading sessions that all see exactly the snapshot S."""

    role = "source"

    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self.facts: Facts = facts_for(90000)
        self.info: SnapshotInfo | None = None
        self.settings: dict[str, str] = {}

    async def _control(self) -> asyncpg.Connection:
        conn = await connect(self.server, role=self.role)
        self.facts = facts_for(await version_num(conn))
        self.settings = sql.session_settings(self.facts)
        return conn

    @property
    def snapshot(self) -> str:
        """S, once taken."""
        assert self.info is not None, "snapshot not taken yet"
        return self.info.snapshot

    async def session(self) -> asyncpg.Connection:
        """A connection inside a REPEATABLE READ READ ONLY transaction at S (verified)."""
        conn = await connect(self.server, role=self.role, settings=self.settings)
        try:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await self._adopt(conn)
            seen = await conn.fetchval(self.facts.snapshot_sql())
            if seen != self._session_snapshot():
                raise SnapshotLostError(
                    f"a new session on the {self.role} sees snapshot {seen}, not S = "
                    f"{self.snapshot}: {self._moved_hint()}"
                )
        except BaseException:
            await conn.close()
            raise
        return conn

    async def take(self) -> SnapshotInfo:
        """Fix S for this run (pause replay, or export a snapshot)."""
        raise NotImplementedError

    async def _adopt(self, conn: asyncpg.Connection) -> None:
        """Make the session's transaction use S (nothing to do on a paused replica)."""

    def _moved_hint(self) -> str:
        return "the snapshot moved"

    def _session_snapshot(self) -> str:
        """What txid_current_snapshot() says in a session that sees S."""
        return self.snapshot

    def dump_args(self) -> list[str]:
        """Extra pg_dump arguments so the schema dump sees S too."""
        return []

    async def close(self, *, success: bool) -> None:
        """Release what was held for S."""


class ReplicaReadSide(ReadSide):
    """Bob with replay paused: every new REPEATABLE READ transaction sees the same snapshot."""

    role = "replica"

    def __init__(self, server: ServerConfig) -> None:
        super().__init__(server)
        self._seen = ""  # txid_current_snapshot() on the paused standby: its in-progress list is always empty

    async def take(self) -> SnapshotInfo:
        """Pause replay, wait until it stopped, and take S."""
        conn = await self._control()
        try:
            await self._check_standby(conn)
            deadline = time.monotonic() + QUIET_TIMEOUT
            while True:
                await conn.execute(self.facts.replay_pause_sql())
                lsn = await self._wait_paused(conn)
                snapshot = await self._paused_snapshot(conn)
                if snapshot is not None:
                    break
                await conn.execute(self.facts.replay_resume_sql())
                if time.monotonic() > deadline:
                    raise CopyError(
                        f"the replica {self.server.describe()} runs PostgreSQL {self.facts.major}, which cannot say "
                        f"which transactions were in progress where its replay paused (txid_status is 10+), and "
                        f"in {QUIET_TIMEOUT:.0f}s of trying it never paused with none in progress (S = "
                        f"{self._seen}); copy from the primary instead (leave replica_* out of the config), or "
                        f"run the copy at a quieter time"
                    )
                # Before 10 only a pause with nothing in progress gives an exact S: replay goes on, try again.
                await asyncio.sleep(_QUIET_RETRY)
            start = await conn.fetchval(sql.postmaster_start_sql())
        finally:
            await conn.close()
        self.info = SnapshotInfo(snapshot, lsn, start)
        log.info("replay paused on the replica at %s; S = %s", lsn, snapshot)
        return self.info

    async def _paused_snapshot(self, conn: asyncpg.Connection) -> str | None:
        """S at the paused replay point, with the txids still in progress there; None when that cannot be told."""
        self._seen = await conn.fetchval(self.facts.snapshot_sql())
        filled = self.facts.standby_snapshot_sql()
        if filled is not None:
            return str(await conn.fetchval(filled))
        xmin, xmax, _ = self._seen.split(":")
        # The standby's xmin is its oldest running txid, or xmax when none runs: then S is exact as it stands.
        return self._seen if xmin == xmax else None

    def _session_snapshot(self) -> str:
        return self._seen

    async def reuse(self, run: CopyRun) -> SnapshotInfo:
        """Check an interrupted run's S still holds (replay still paused at the same place, no restart)."""
        conn = await self._control()
        try:
            await self._check_standby(conn)
            start = await conn.fetchval(sql.postmaster_start_sql())
            if start != run.replica_start:
                raise SnapshotLostError(
                    f"the replica restarted (at {start}) since S was taken; its paused state is gone"
                )
            if not await conn.fetchval(self.facts.pause_requested_sql()):
                raise SnapshotLostError("replay on the replica was resumed since S was taken")
            lsn = await self._wait_paused(conn)
            if lsn != run.snapshot_lsn:
                raise SnapshotLostError(f"the replica replayed from {run.snapshot_lsn} to {lsn} since S was taken")
            snapshot = await self._paused_snapshot(conn)
            if snapshot is None or snapshot != run.snapshot:
                raise SnapshotLostError(f"the replica's snapshot is now {snapshot}, not S = {run.snapshot}")
        finally:
            await conn.close()
        self.info = SnapshotInfo(snapshot, lsn, start)
        return self.info

    async def _check_standby(self, conn: asyncpg.Connection) -> None:
        if not await conn.fetchval(sql.in_recovery_sql()):
            raise CopyError(
                f"the configured replica {self.server.describe()} is not in recovery (not a "
                f"standby); fix replica_* in the config or remove it to copy from the primary"
            )

    async def _wait_paused(self, conn: asyncpg.Connection) -> str:
        # Before 14, pg_is_xlog_replay_paused() only says a pause was requested; the startup process
        # finishes the record it is applying first. A position unchanged over a few polls is reached.
        deadline = time.monotonic() + PAUSE_TIMEOUT
        state_sql = self.facts.pause_state_sql()
        last, stable = None, 0
        while time.monotonic() < deadline:
            lsn = await conn.fetchval(self.facts.replay_lsn_sql())
            paused = state_sql is None or await conn.fetchval(state_sql) == "paused"
            stable = stable + 1 if lsn == last and paused else 0
            if stable >= _STABLE_POLLS:
                return str(lsn)
            last = lsn
            await asyncio.sleep(_POLL_INTERVAL)
        raise CopyError(
            f"replay on the replica {self.server.describe()} did not stop within {PAUSE_TIMEOUT:.0f}s "
            f"after pausing it (last position {last})"
        )

    def _moved_hint(self) -> str:
        return "replay on the replica was resumed by someone else during the copy"

    async def close(self, *, success: bool) -> None:
        """Resume replay after a successful copy; after a failure keep it paused so a rerun reuses S."""
        if not success:
            log.warning(
                "replay on the replica %s stays paused so that a rerun can reuse S; to give up, run SELECT %s there",
                self.server.describe(),
                self.facts.replay_resume_sql()[7:],
            )
            return
        await resume_replay(self.server)


async def resume_replay(server: ServerConfig) -> None:
    """Resume WAL replay on a standby."""
    conn = await connect(server, role="replica")
    try:
        facts = facts_for(await version_num(conn))
        await conn.execute(facts.replay_resume_sql())
    finally:
        await conn.close()


class PrimaryReadSide(ReadSide):
    """Alice: one REPEATABLE READ transaction exports its snapshot; every session imports it."""

    role = "source"

    def __init__(self, server: ServerConfig) -> None:
        super().__init__(server)
        self._holder: asyncpg.Connection | None = None
        self.snapshot_name = ""

    async def take(self) -> SnapshotInfo:
        """Open the exporting transaction (kept open until close) and take S in it."""
        conn = await self._control()
        try:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            self.snapshot_name = await conn.fetchval(self.facts.export_snapshot_sql())
            snapshot = await conn.fetchval(self.facts.snapshot_sql())
        except BaseException:
            await conn.close()
            raise
        self._holder = conn
        self.info = SnapshotInfo(snapshot)
        log.info("exported snapshot %s on the primary; S = %s", self.snapshot_name, snapshot)
        return self.info

    async def _adopt(self, conn: asyncpg.Connection) -> None:
        await conn.execute(f"SET TRANSACTION SNAPSHOT {quote_literal(self.snapshot_name)}")

    def _moved_hint(self) -> str:
        return "the exporting transaction ended"

    def dump_args(self) -> list[str]:
        """pg_dump --snapshot: the schema dump reads at S too."""
        return [f"--snapshot={self.snapshot_name}"]

    async def close(self, *, success: bool) -> None:
        """End the exporting transaction."""
        del success
        if self._holder is not None:
            await self._holder.close()
            self._holder = None
