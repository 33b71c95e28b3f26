"""Verification and re-sync inside the pgleap process, where replay runs: what VERIFY TABLE and
FORCE RESYNC TABLE call, and what status shows afterwards.

A verification that finds differences repairs them when `resync_on_error` is on: the differing rows (or,
for a table without a key, the whole table) are copied again at a point, then checked again at a new
point, up to `max_resync_attempts` times. What stays different is reported, never hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from pgleap.config import UpgradeConfig
from pgleap.errors import PgleapError
from pgleap.upgrade.compat.facts import facts_for
from pgleap.upgrade.copy.connect import connect, version_num
from pgleap.upgrade.copy.model import Table
from pgleap.upgrade.copy.plan import load_tables
from pgleap.upgrade.replay.applier import Replayer
from pgleap.upgrade.replay.journal import ApplyJournal
from pgleap.upgrade.replay.point import WORK_SETTINGS
from pgleap.upgrade.verify.checksums import Key
from pgleap.upgrade.verify.resync import ResyncResult, resync_keys, resync_table
from pgleap.upgrade.verify.table import RowDifference, TableVerification, TableVerifier

log = logging.getLogger(__name__)

_HISTORY = 200  # table reports kept for SHOW UPGRADE STATUS / ERRORS
FLAGGED_INTERVAL = 10.0  # seconds between looks for tables replay flagged for re-sync
# A table flagged again and again (triggers, a job queue's SKIP LOCKED) is verified whole each time: at most
# this share of the time, so a big busy table does not keep both servers scanning it.
FLAGGED_DUTY = 0.1


class VerifyError(PgleapError):
    """Verification cannot run: no replay for the database, an unknown table, the source unreachable."""


@dataclass
class TableReport:
    """One table's verification, and the re-syncs it led to."""

    verification: TableVerification
    repairs: list[ResyncResult] = field(default_factory=list)
    remaining: list[RowDifference] = field(default_factory=list)  # still different after the last repair
    remaining_whole_table: bool = False
    finished_at: float = field(default_factory=time.time)

    @property
    def clean(self) -> bool:
        """Nothing differs now (found clean, or repaired and checked again)."""
        if self.repairs:
            return not self.remaining and not self.remaining_whole_table
        return self.verification.clean


class VerifyService:
    """Verifies and re-syncs tables of the databases whose replay runs in this process."""

    def __init__(
        self, upgrade_of: Callable[[str], UpgradeConfig | None], replayer_of: Callable[[str], Replayer | None]
    ) -> None:
        self.upgrade_of = upgrade_of
        self.replayer_of = replayer_of
        self.reports: list[TableReport] = []
        self._stop_watching = asyncio.Event()
        self._resync_due: dict[tuple[str, str], float] = {}  # (database, table) -> when it may be verified again

    def last_reports(self) -> dict[tuple[str, str], TableReport]:
        """The latest report per (database, table)."""
        latest: dict[tuple[str, str], TableReport] = {}
        for report in self.reports:
            latest[(report.verification.database, report.verification.table)] = report
        return latest

    async def verify(
        self, database: str, names: list[str] | None = None, *, repair: bool | None = None, every_match: bool = False
    ) -> list[TableReport]:
        """Verify the named tables (every table when None) of `database`, repairing per config or `repair`;
        `every_match`: a bare name several schemas have stands for all of those tables."""
        upgrade, replayer = self._prepared(database)
        do_repair = upgrade.sync.resync_on_error if repair is None else repair
        source = await self._source(upgrade)
        try:
            reports = []
            for table in await self._tables(source, database, names, every_match=every_match):
                verifier = self._verifier(upgrade, replayer, source, table)
                report = TableReport(await verifier.run())
                if do_repair and not report.verification.clean:
                    await self._repair(upgrade, replayer, source, table, verifier, report)
                report.finished_at = time.time()
                self._keep(report)
                reports.append(report)
            return reports
        finally:
            await source.close()

    async def resync_flagged(self, database: str, journal: ApplyJournal) -> list[TableReport]:
        """Verify and repair the tables replay flagged for re-sync (a skipped transaction); unflag the clean ones."""
        reports = []
        for name, flagged_at in journal.resync_flags(database).items():
            if time.monotonic() < self._resync_due.get((database, name), 0.0):
                continue  # verified a moment ago; it stays flagged until its turn
            started = time.monotonic()
            try:
                # Flags name tables as the statements wrote them: a bare name may be one table per tenant schema.
                found = await self.verify(database, [name], repair=True, every_match=True)
            except PgleapError as exc:
                log.error("re-sync of flagged table %s.%s failed: %s; it stays flagged", database, name, exc)
                continue
            finally:
                spent = time.monotonic() - started
                self._resync_due[(database, name)] = time.monotonic() + spent * (1 / FLAGGED_DUTY - 1)
            reports += found
            if all(report.clean for report in found):
                # Flagged again while it was verified (a later position): that write may be after the point checked.
                journal.clear_resync(database, name, through=flagged_at)
        return reports

    async def watch_flagged(self, databases: Callable[[], list[str]], journal: ApplyJournal) -> None:
        """Until stop_watching(): re-sync flagged tables of `databases()` whose resync_on_error is on."""
        self._stop_watching.clear()
        while not self._stop_watching.is_set():
            for database in databases():
                upgrade = self.upgrade_of(database)
                if upgrade is not None and upgrade.sync.resync_on_error and journal.resync_tables(database):
                    await self.resync_flagged(database, journal)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_watching.wait(), FLAGGED_INTERVAL)

    def stop_watching(self) -> None:
        """End watch_flagged (replay is stopping)."""
        self._stop_watching.set()

    async def force_resync(self, database: str, name: str) -> ResyncResult:
        """Copy one whole table again at a point, whatever verification would say; its re-sync flags are cleared."""
        upgrade, replayer = self._prepared(database)
        source = await self._source(upgrade)
        try:
            tables = await self._tables(source, database, None)
            (table,) = _named(tables, database, [name])
            journal = replayer.journal
            # Its flags as they stand now (one set again while it is copied may be past the copy's point); a flag
            # by bare name only when no other table has that name (one schema per tenant, say).
            bare = sum(1 for t in tables if t.name == table.name) == 1
            names = (table.label, table.name) if bare else (table.label,)
            flags = {key: at for key, at in journal.resync_flags(database).items() if key in names}
            result = await resync_table(replayer, source, table)
            for key, at in flags.items():
                journal.clear_resync(database, key, through=at)
            log.info(
                "re-sync of %s.%s: %d rows copied, %d removed", database, table.label, result.copied, result.deleted
            )
            return result
        finally:
            await source.close()

    async def repair_rows(self, database: str, name: str, keys: list[Key]) -> tuple[ResyncResult, list[RowDifference]]:
        """Re-sync the rows with these keys, then compare them again: (what was done, what still differs)."""
        upgrade, replayer = self._prepared(database)
        source = await self._source(upgrade)
        try:
            (table,) = await self._tables(source, database, [name])
            done = await resync_keys(replayer, source, table, keys)
            return done, await self._verifier(upgrade, replayer, source, table).verify_keys(keys)
        finally:
            await source.close()

    async def _repair(
        self,
        upgrade: UpgradeConfig,
        replayer: Replayer,
        source: asyncpg.Connection,
        table: Table,
        verifier: TableVerifier,
        report: TableReport,
    ) -> None:
        found = report.verification
        keys = [d.key for d in found.differences]
        whole = found.whole_table_differs
        for _ in range(upgrade.sync.max_resync_attempts):
            if whole:
                report.repairs.append(await resync_table(replayer, source, table))
                again = await self._verifier(upgrade, replayer, source, table).run()
                whole, report.remaining_whole_table = again.whole_table_differs, again.whole_table_differs
                report.remaining = again.differences
                if not whole and not again.differences:
                    return
                keys = [d.key for d in again.differences]
                continue
            report.repairs.append(await resync_keys(replayer, source, table, keys))
            report.remaining = await verifier.verify_keys(keys)
            if not report.remaining:
                return
            keys = [d.key for d in report.remaining]
        log.error(
            "re-sync of %s.%s: still different after %d attempts (%d rows%s); see SHOW UPGRADE ERRORS",
            found.database,
            found.table,
            len(report.repairs),
            len(report.remaining),
            ", whole table" if report.remaining_whole_table else "",
        )

    def _keep(self, report: TableReport) -> None:
        self.reports.append(report)
        del self.reports[:-_HISTORY]
        v = report.verification
        log.info(
            "verified %s.%s: %d chunks, %d differing, %d rows differ%s, %.2fs, %d points%s",
            v.database,
            v.table,
            v.chunks,
            v.differing_chunks,
            len(v.differences),
            " (whole table, no primary key)" if v.whole_table_differs else "",
            v.seconds,
            v.points,
            "; repaired" if report.repairs and report.clean else "",
        )

    def _verifier(
        self, upgrade: UpgradeConfig, replayer: Replayer, source: asyncpg.Connection, table: Table
    ) -> TableVerifier:
        return TableVerifier(
            replayer,
            source,
            table,
            chunk_rows=upgrade.sync.verify_chunk_rows,
            chunks_per_round=upgrade.sync.verify_chunks_per_round,
        )

    def _prepared(self, database: str) -> tuple[UpgradeConfig, Replayer]:
        upgrade = self.upgrade_of(database)
        if upgrade is None:
            raise VerifyError(f"no [[auto_upgrade]] entry for database {database!r}")
        replayer = self.replayer_of(database)
        if replayer is None:
            raise VerifyError(
                f"database {database!r}: replay is not running; verification compares source and target at "
                f"the same point of the change stream, which only replay can hold: START REPLAY first"
            )
        return upgrade, replayer

    async def _source(self, upgrade: UpgradeConfig) -> asyncpg.Connection:
        # Read on the primary: the point's snapshot must be one the change log's commits are ordered
        # against, and unlogged tables cannot be read on a standby.
        settings = {"application_name": "pgleap_verify", **WORK_SETTINGS}
        return await connect(upgrade.source, role="source", settings=settings)

    async def _tables(
        self, source: asyncpg.Connection, database: str, names: list[str] | None, *, every_match: bool = False
    ) -> list[Table]:
        tables = await load_tables(source, facts_for(await version_num(source)), allow_binary=False)
        return tables if names is None else _named(tables, database, names, every_match=every_match)


def _named(tables: list[Table], database: str, names: list[str], *, every_match: bool = False) -> list[Table]:
    """The tables `names` name ("schema.table", or a bare name one table has; all that have it: `every_match`)."""
    chosen = []
    for name in names:
        matches = [t for t in tables if name in (t.label, t.name)]
        if not matches or (len(matches) > 1 and not every_match):
            found = "no table" if not matches else f"{len(matches)} tables ({', '.join(t.label for t in matches)})"
            raise VerifyError(f"database {database!r}: {found} named {name!r}; give it as schema.table")
        chosen += matches
    return chosen
