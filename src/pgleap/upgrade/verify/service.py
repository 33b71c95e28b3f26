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
from pgleap.upgrade.replay.journal import EVERY_TABLE, ApplyJournal
from pgleap.upgrade.replay.point import WORK_SETTINGS
from pgleap.upgrade.verify.checksums import Key
from pgleap.upgrade.verify.flags import clear_covered, resolve, stands_for
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
        self._resync_due: dict[tuple[str, str], float] = {}  # (database, flag) -> when it may be checked again

    def last_reports(self) -> dict[tuple[str, str], TableReport]:
        """The latest report per (database, table)."""
        latest: dict[tuple[str, str], TableReport] = {}
        for report in self.reports:
            latest[(report.verification.database, report.verification.table)] = report
        return latest

    async def verify(
        self, database: str, names: list[str] | None = None, *, repair: bool | None = None
    ) -> list[TableReport]:
        """Verify the named tables (every table when None) of `database`, repairing per config or `repair`; the
        re-sync flags standing only for tables found clean are cleared."""
        upgrade, replayer = self._prepared(database)
        source = await self._source(upgrade)
        try:
            # Flags first: every table a flagged write reached existed then, so the load lists it (when it lists it at
            # all); and one set during the check may be past its point.
            flags = replayer.journal.resync_flags(database)
            every = await self._tables(source, database, None)
            tables = every if names is None else _named(every, database, names)
            do_repair = upgrade.sync.resync_on_error if repair is None else repair
            reports = await self._check(upgrade, replayer, source, tables, do_repair)
            clean = {t.oid for t, report in zip(tables, reports, strict=True) if report.clean}
            await clear_covered(source, every, replayer.journal, database, flags, clean)
            return reports
        finally:
            await source.close()

    async def _check(
        self, upgrade: UpgradeConfig, replayer: Replayer, source: asyncpg.Connection, tables: list[Table], repair: bool
    ) -> list[TableReport]:
        reports = []
        for table in tables:
            verifier = self._verifier(upgrade, replayer, source, table)
            report = TableReport(await verifier.run())
            if repair and not report.verification.clean:
                await self._repair(upgrade, replayer, source, table, verifier, report)
            report.finished_at = time.time()
            self._keep(report)
            reports.append(report)
        return reports

    async def resync_flagged(self, database: str, journal: ApplyJournal) -> list[TableReport]:
        """Verify and repair the tables replay flagged for re-sync (a skipped transaction); unflag the clean ones.

        Each table is checked once however many flags stand for it (each flag naming no table stands for every
        table). A flag still there after a pass is due again after nine times as long as the pass took.
        """
        now = time.monotonic()
        flags = journal.resync_flags(database)
        due = {name: at for name, at in flags.items() if now >= self._resync_due.get((database, name), 0.0)}
        if not due:
            return []
        try:
            upgrade, replayer = self._prepared(database)
            source = await self._source(upgrade)
        except PgleapError as exc:
            log.error("re-sync of the flagged tables of %s cannot start: %s; they stay flagged", database, exc)
            return []
        reports: list[TableReport] = []
        try:
            tables = await self._tables(source, database, None)
            required = set(journal.required_resyncs(database))
            needed = {name: await stands_for(source, tables, name, required=name in required) for name in due}
            for name, stands in needed.items():
                if name != EVERY_TABLE and stands is tables:  # widened to every table
                    log.warning(
                        "%s: re-sync flag %r reaches what verification cannot check (a view, a foreign table, a "
                        "table it does not list, or nothing): every table is verified for it",
                        database,
                        name,
                    )
            started = time.monotonic()
            clean: set[int] = set()
            for table in {t.oid: t for stands in needed.values() for t in stands}.values():
                try:
                    reports += await self._check(upgrade, replayer, source, [table], True)
                    if reports[-1].clean:
                        clean.add(table.oid)
                except (PgleapError, asyncpg.PostgresError) as exc:  # dropped since the load, say
                    log.error("re-sync of flagged table %s.%s failed: %s; it stays flagged", database, table.label, exc)
            # Flags read before the pass: one set again meanwhile (a later position) may be past the point.
            gone = set(await clear_covered(source, tables, journal, database, due, clean))
        finally:
            await source.close()
        # The whole pass's time for every flag still there, so all of them together keep to FLAGGED_DUTY; a flag
        # that is gone is forgotten (flagged anew, by another skip, it is due at once).
        wait = (time.monotonic() - started) * (1 / FLAGGED_DUTY - 1)
        for name in due:
            if name in gone:
                self._resync_due.pop((database, name), None)
            else:
                self._resync_due[(database, name)] = time.monotonic() + wait
        return reports

    async def watch_flagged(self, databases: Callable[[], list[str]], journal: ApplyJournal) -> None:
        """Until stop_watching(): re-sync flagged tables of `databases()` whose resync_on_error is on."""
        self._stop_watching.clear()
        while not self._stop_watching.is_set():
            for database in databases():
                upgrade = self.upgrade_of(database)
                if upgrade is not None and upgrade.sync.resync_on_error and journal.resync_tables(database):
                    try:
                        await self.resync_flagged(database, journal)
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        # The source went away mid-pass: the flags stay, and the next look tries again.
                        log.error("re-sync of the flagged tables of %s stopped: %s; they stay flagged", database, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_watching.wait(), FLAGGED_INTERVAL)

    def stop_watching(self) -> None:
        """End watch_flagged (replay is stopping)."""
        self._stop_watching.set()

    async def force_resync(self, database: str, name: str) -> list[ResyncResult]:
        """Copy one whole table again at a point (with its partitions and inheritors), whatever verification
        would say; the re-sync flags standing only for tables copied are cleared."""
        upgrade, replayer = self._prepared(database)
        source = await self._source(upgrade)
        try:
            flags = replayer.journal.resync_flags(database)  # before the load and the copy, as in verify()
            tables = await self._tables(source, database, None)
            found = await resolve(source, tables, name)
            if not found.tables:
                raise VerifyError(f"database {database!r}: no table named {name!r}; give it as schema.table")
            if found.named > 1:
                raise VerifyError(
                    f"database {database!r}: {found.named} relations named {name!r} (in several schemas); "
                    "give it as schema.table"
                )
            journal = replayer.journal
            results = []
            for table in found.tables:
                results.append(await resync_table(replayer, source, table))
                log.info(
                    "re-sync of %s.%s: %d rows copied, %d removed",
                    database,
                    table.label,
                    results[-1].copied,
                    results[-1].deleted,
                )
            await clear_covered(source, tables, journal, database, flags, {t.oid for t in found.tables})
            return results
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

    async def _tables(self, source: asyncpg.Connection, database: str, names: list[str] | None) -> list[Table]:
        tables = await load_tables(source, facts_for(await version_num(source)), allow_binary=False)
        return tables if names is None else _named(tables, database, names)


def _named(tables: list[Table], database: str, names: list[str]) -> list[Table]:
    """The tables `names` name ("schema.table", or a bare name one table has)."""
    chosen = []
    for name in names:
        matches = [t for t in tables if name in (t.label, t.name)]
        if len(matches) != 1:
            found = "no table" if not matches else f"{len(matches)} tables ({', '.join(t.label for t in matches)})"
            raise VerifyError(f"database {database!r}: {found} named {name!r}; give it as schema.table")
        chosen += matches
    return chosen
