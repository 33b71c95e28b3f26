"""Applying the change log on the target: in commit order, exactly once, stitched to the copy by S.

Each round trip carries one target transaction holding several source transactions:

    BEGIN; per source transaction: set_config(...) for its captured settings, then its statements;
    upsert of the applied position into pgleap.applied; COMMIT; Sync

all pipelined. The position commits with the changes it covers, so after any crash (pgleap, the
connection, the target) replay reads it back from the target and resumes right after it (I4).
Transactions visible in the copy snapshot S are already in the copied data: they only move the
position. A batch that fails is rolled back and applied again one source transaction at a time, to
find the one the target refuses; that one pauses replay or is skipped and its tables flagged for
re-sync (`on_apply_error`), and is recorded either way (I1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pgleap.config import ServerConfig, UpgradeConfig
from pgleap.protocol.messages import ServerError
from pgleap.store.changelog import ChangeLog
from pgleap.store.records import CapturedCheck, CapturedStatement, LoggedTransaction, decode_image
from pgleap.upgrade.capture.classify import UNREPEATABLE_FUNCTIONS, WRITES_NO_TABLE, Kind, StatementInfo, classify
from pgleap.upgrade.capture.pinning import pin_time, reads_the_clock_as_input
from pgleap.upgrade.capture.probe import is_settings_statement, settings_statement
from pgleap.upgrade.compat.adapters import VersionAdapter, adapter_for
from pgleap.upgrade.compat.facts import PG90, Facts, facts_for
from pgleap.upgrade.replay.ddl_queue import DDLQueue, HeldDDL, changes_schema
from pgleap.upgrade.replay.errors import (
    ApplyError,
    Divergence,
    ReplayError,
    TargetRefusedError,
    TransientApplyError,
    blames_target,
    classify_sqlstate,
)
from pgleap.upgrade.replay.images import combined_tag, image_statements
from pgleap.upgrade.replay.indirect import IndirectWrites, read_indirect_writes
from pgleap.upgrade.replay.journal import EVERY_TABLE, ApplyJournal
from pgleap.upgrade.replay.lag import RateMeter, ReplayLag
from pgleap.upgrade.replay.point import WORK_SETTINGS, PointRequest, SourcePoint, Work
from pgleap.upgrade.replay.position import (
    GUARD_SQL,
    POSITION_MOVED,
    POSITION_PARAM_TYPES,
    database_oid,
    move_position,
    read_position,
    server_version_num,
    store_position_sql,
)
from pgleap.upgrade.replay.recomputed import defaulted_tables, named_among, triggered_tables, volatile_functions
from pgleap.upgrade.replay.retention import LogRetention
from pgleap.upgrade.replay.snapshot import Snapshot, Stitch, make_stitch
from pgleap.upgrade.replay.wire import Pipeline, Slot, TargetSession, is_copy_from_stdin

log = logging.getLogger(__name__)

OnApplyError = Literal["pause", "skip_and_resync"]
_SETTINGS_INDEX = -1  # statement_index of pgleap's own set_config (and COMMIT) in error records
_CHECK_SAVEPOINT = "pgleap_check"


class CheckRun(Protocol):
    """One recorded read being run again on the target (result comparison, verify/results.py)."""

    settings: tuple[tuple[str, str], ...]  # set (locally, inside the check's savepoint) before the read

    def row(self, kind: int, body: bytes) -> None:
        """The read's RowDescription or one DataRow, as the target sends it."""

    def done(self, error: ServerError | None, seconds: float) -> None:
        """The read's outcome, once the replayed transaction around it has committed."""


class CheckRunner(Protocol):
    """Decides which recorded reads run while their transaction is replayed, and judges them."""

    def run_check(self, database: str, record: LoggedTransaction, check: CapturedCheck) -> CheckRun | None:
        """A run for `check`, or None to leave it out (disabled, or replay is too far behind: counted)."""


@dataclass
class _Check:
    run: CheckRun
    start: Slot  # the Sync just before the read: when its answer arrives, the target starts the read
    read: Slot


@dataclass
class _Planned:
    """One source transaction in a pipeline: skipped (visible in S) or its slots by statement index."""

    record: LoggedTransaction
    in_snapshot: bool
    slots: list[tuple[int, str, Slot]] = field(default_factory=list)  # (statement index, sql sent, slot)
    checks: list[_Check] = field(default_factory=list)


@dataclass
class _Failure:
    """The first error of a pipeline and where it happened."""

    error: ServerError
    planned: _Planned | None  # None: pgleap's own BEGIN / position / COMMIT
    statement_index: int
    statement: str


@dataclass(frozen=True)
class ReplayStatus:
    """What replay has done since this Replayer started, and where it stands."""

    database: str
    applied_position: int
    applied: int  # source transactions applied on the target
    skipped_in_snapshot: int  # source transactions already in the copy (visible in S)
    skipped_on_error: int  # source transactions skipped under on_apply_error = "skip_and_resync"
    divergences: int  # statements whose command tag differed from the source's
    paused: ApplyError | None  # the transaction replay is stopped at, under on_apply_error = "pause"
    held_ddl: HeldDDL | None  # the schema change replay waits in front of, under ddl = "queue"
    connected: bool
    retries: int  # transient failures retried (reconnects)
    last_transient_error: str | None


class Replayer:
    """Applies one database's change log on the upgrade's target."""

    def __init__(
        self,
        upgrade: UpgradeConfig,
        changelog: ChangeLog,
        snapshot: str,
        *,
        batch_size: int = 200,
        on_apply_error: OnApplyError = "pause",
        journal: ApplyJournal | None = None,
        poll_interval: float = 0.05,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        max_retries: int | None = None,
        connect_timeout: float = 10.0,
        table_snapshots: dict[str, str] | None = None,
        queue_ddl: bool = False,
        retain: int | None = None,
        copied_until: float | None = None,
        target_oid: int | None = None,
    ) -> None:
        if upgrade.target is None:
            raise ReplayError(
                f"database {upgrade.database!r} has no target configured; set target_host and "
                f"target_port in its [[auto_upgrade]] entry"
            )
        if on_apply_error not in ("pause", "skip_and_resync"):
            raise ReplayError(f'on_apply_error must be "pause" or "skip_and_resync", not {on_apply_error!r}')
        if batch_size < 1:
            raise ReplayError(f"batch_size must be at least 1, not {batch_size}")
        self.database = upgrade.database
        self.target: ServerConfig = upgrade.target
        self.source: ServerConfig = upgrade.source
        self.adapter: VersionAdapter = adapter_for(upgrade)
        self._majors: tuple[int, int] | None = None  # (source, target) server_version_num, when they differ
        self.changelog = changelog
        self.stitch: Stitch = make_stitch(snapshot, table_snapshots)
        self.snapshot: Snapshot = self.stitch.default
        # When the copy finished: a record without a txid captured before then may be in the copy already.
        self.copied_until = copied_until
        # The target database S belongs to (its oid); None: the first one replay connects to.
        self.target_oid = target_oid
        self.batch_size = batch_size
        self.on_apply_error = on_apply_error
        self.journal = journal if journal is not None else ApplyJournal()
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_retries = max_retries
        self.connect_timeout = connect_timeout
        self.position = 0  # the applied position, as last read from or committed to the target
        self.position_known = False  # read from the target at least once
        self.paused: ApplyError | None = None
        self.applied = 0
        self.skipped_in_snapshot = 0
        self.skipped_on_error = 0
        self.divergence_count = 0
        self.retries = 0
        self.last_transient_error: str | None = None
        self._session: TargetSession | None = None
        self._store_sql = ""
        self._target_facts: Facts = facts_for(PG90)  # learned at each connect
        self._triggered: frozenset[str] = frozenset()  # tables with triggers on the target, read at each connect
        self._defaulted: frozenset[str] = frozenset()  # and tables with defaults the target computes
        self._volatile: frozenset[str] = frozenset()  # and its volatile functions outside pg_catalog
        self._indirect = IndirectWrites()  # and what a write changes beyond the tables it names
        self._flags: dict[str, tuple[int, str, bool]] = {}  # re-sync flags of the batch being planned
        self._failures = 0
        self._skip_paused: ApplyError | None = None
        self._caught_up = False  # the last step applied everything the log held (less than a batch)
        self._rate = RateMeter()
        self.ddl_queue = DDLQueue(self.database, queue_ddl)
        self._points: deque[PointRequest] = deque()
        self.points_run = 0  # works run at a source point
        self.points_reordered = 0  # of those, how many had unseen transactions applied after the work
        # Result comparison's judge of the reads recorded inside transactions; None: they are not run.
        self.check_runner: CheckRunner | None = None
        # Applied records deleted `retain` positions behind (None: the log keeps everything).
        self.retention = LogRetention(changelog, self.database, retain) if retain is not None else None

    # -- driving ----------------------------------------------------------------------------

    async def run_until_caught_up(self) -> ReplayStatus:
        """Apply every committed transaction in the log now, then return (early if paused)."""
        await self._loop(None, follow=False)
        return self.status()

    async def run(self, stop_event: asyncio.Event) -> ReplayStatus:
        """Keep applying as the log grows until `stop_event` is set; stays connected while paused."""
        await self._loop(stop_event, follow=True)
        return self.status()

    def resume(self, *, skip: bool = False) -> None:
        """Continue after a pause: retry the transaction (after fixing the target) or skip it and flag its tables."""
        if self.paused is None:
            return
        if skip:
            self._skip_paused = self.paused
        self.paused = None

    def request_point(self, work: Work, **timeouts: float) -> PointRequest:
        """Queue `work` to run on the target at a source point the caller fixes once replay holds (see point)."""
        request = PointRequest(work, **timeouts)
        self._points.append(request)
        return request

    def close(self) -> None:
        """Close the target connection."""
        self._drop_connection()

    @property
    def backend_pid(self) -> int | None:
        """The pid of the target backend replay uses (None while disconnected)."""
        return self._session.pid if self._session is not None else None

    def status(self) -> ReplayStatus:
        """Counters and state, for status output and metrics."""
        return ReplayStatus(
            self.database,
            self.position,
            self.applied,
            self.skipped_in_snapshot,
            self.skipped_on_error,
            self.divergence_count,
            self.paused,
            self.ddl_queue.held,
            self._session is not None,
            self.retries,
            self.last_transient_error,
        )

    def lag(self) -> ReplayLag:
        """Transactions, bytes and seconds behind the log, and the recent apply rate."""
        # One aggregate, no record decoded: SHOW REPLAY and every metrics scrape ask for this.
        count, nbytes, oldest = self.changelog.backlog(self.database, self.position)
        seconds = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        return ReplayLag(
            self.database,
            self.position,
            self.changelog.last_position(self.database),
            count,
            nbytes,
            seconds,
            self._rate.rate(),
            self.position_known,
        )

    async def _loop(self, stop: asyncio.Event | None, follow: bool) -> None:
        while stop is None or not stop.is_set():
            self._expire_points()
            if self.paused is not None:
                if not follow:
                    return
                await _wait(stop, self.poll_interval)
                continue
            started = time.monotonic()
            try:
                if self._session is None:
                    await self._connect()
                progressed = await self._step()
                self._failures = 0
                if self.retention is not None:
                    await self.retention.trim(self.position)
            except TransientApplyError as exc:
                self._retry_later(exc)
                await _wait(stop, self._backoff())
                continue
            if not progressed:
                if not follow:
                    return
                await _wait(stop, self.poll_interval)
            elif follow and self._caught_up and not self._points:
                # Keeping up: one batch per poll interval, not one per handful of records. Every batch costs a
                # log read, BEGIN, the position check and COMMIT; under load, back-to-back batches held a few
                # records each. What is left behind (a full batch, a batch cut short) or a point someone waits
                # for goes on at once.
                rest = self.poll_interval - (time.monotonic() - started)
                if rest > 0:
                    await _wait(stop, rest)

    def _expire_points(self) -> None:
        while self._points:
            request = self._points[0]
            reason = request.overdue()
            if self.paused is not None:
                reason = f"replay is paused at position {self.paused.position}: {self.paused.message}"
            if reason is not None:
                request.fail(reason)
            if not request.done:
                return
            self._points.popleft()

    def _retry_later(self, exc: TransientApplyError) -> None:
        self._drop_connection()
        self._failures += 1
        self.retries += 1
        self.last_transient_error = str(exc)
        if self.max_retries is not None and self._failures > self.max_retries:
            raise ReplayError(
                f"replay of {self.database!r} to {self.target.host}:{self.target.port} failed "
                f"{self._failures} times in a row, last: {exc}; check that the target is up and "
                f"reachable, then start replay again (it resumes at position {self.position})"
            ) from exc
        log.warning(
            "replay of %s: %s; retrying in %.1fs (attempt %d), resuming from the target's applied position",
            self.database,
            exc,
            self._backoff(),
            self._failures,
        )

    def _backoff(self) -> float:
        return float(min(self.backoff_max, self.backoff_initial * 2 ** max(self._failures - 1, 0)))

    async def _connect(self) -> None:
        session = await TargetSession.open(self.target, self.connect_timeout)
        try:
            target_num = await server_version_num(session)
            self._target_facts = facts_for(target_num)
            self._store_sql = store_position_sql(self._target_facts)
            await self._learn_majors(target_num)
            await self._check_same_database(session)  # before read_position writes into it
            await self._learn_recomputed(session)
            position = await read_position(session, self.database, self._target_facts)
            position = await self._pass_trimmed(session, position)
            self.position_known = True
        except BaseException:
            session.close()
            raise
        last = self.changelog.last_position(self.database)
        if position > last:
            session.close()
            raise ReplayError(
                f"the target has applied position {position} of {self.database!r} but the change log "
                f"ends at {last}: this target was fed from another change log; point pgleap at that "
                f"log, or drop the target database and copy again"
            )
        self._session = session
        self.position = position

    async def _learn_recomputed(self, session: TargetSession) -> None:
        self._defaulted = await defaulted_tables(session, self._target_facts)
        self._volatile = await volatile_functions(session)
        triggered = await triggered_tables(session)
        if triggered and triggered != self._triggered:
            log.warning(
                "replay of %s: tables with triggers enabled on the target: %s; the triggers fire again as replay "
                "writes, and what they compute may differ from the source's, so each table replay writes is "
                "flagged for re-sync (verification repairs it)",
                self.database,
                ", ".join(sorted(triggered)),
            )
        self._triggered = triggered
        self._indirect = await read_indirect_writes(session, triggered)

    async def _check_same_database(self, session: TargetSession) -> None:
        oid = await database_oid(session)
        if self.target_oid is None:
            self.target_oid = oid
        elif oid != self.target_oid:
            # Dropped and created again (a new `pgleap copy`, or by hand): what it holds is not the copy at this
            # replayer's S, so applying the log there would double or miss transactions.
            raise ReplayError(
                f"the target database {self.target.describe()} is not the one this replay started on (its oid "
                f"is {oid}, not {self.target_oid}): it was dropped and created again since, as copying again "
                f"does; replay stopped without writing to it. Once that copy has finished, START REPLAY again: "
                f"it starts from the new copy's snapshot S"
            )

    async def _pass_trimmed(self, session: TargetSession, position: int) -> int:
        """Start after records retention deleted when the copy snapshot holds every one of them.

        A target copied again (after ROLLBACK UPGRADE, say) starts at position 0, but the log may have lost
        its first records to retention. Each was applied to the earlier target, so it committed before that
        target was dropped; but only its txid, below every snapshot's xmin, proves it is in this copy.
        """
        trimmed = self.changelog.trimmed(self.database)
        if position >= trimmed.through:
            return position
        xmin = min(snap.xmin for snap in (self.stitch.default, *self.stitch.tables.values()))
        if trimmed.unplaced or trimmed.max_txid is None or trimmed.max_txid >= xmin:
            return position  # _step stops replay: the deleted records may not be in the copy
        # Retention deletes by age as well as position, so records may remain below `through` (one positioned
        # late, after a crash): only the run deleted in front of the first record still here is passed over.
        present = self.changelog.read_committed(self.database, position, 1)
        through = min(trimmed.through, present[0].position - 1) if present and present[0].position else trimmed.through
        if through <= position:
            return position
        await move_position(session, self.database, position, through)
        log.info(
            "replay of %s: positions %d to %d were deleted from the change log, and all of them (txids up to %d) "
            "are in the copy at %s; replay starts after them",
            self.database,
            position + 1,
            through,
            trimmed.max_txid,
            self.stitch.default,
        )
        return through

    def _drop_connection(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # -- one step ---------------------------------------------------------------------------

    async def _step(self) -> bool:
        request = self._points[0] if self._points else None
        if request is not None and request.point is None:
            request.hold()  # nothing is applied while the caller takes its source snapshot
            return False
        self._caught_up = False
        records = self.changelog.read_committed(self.database, self.position, self.batch_size)
        if request is not None and request.point is not None:
            # Only what the source point sees, until the target stands exactly there.
            visible = _visible_prefix(records, request.point)
            if not visible:
                return await self._reach_point(request, request.point)
            records = visible
        if not records:
            return False
        if records[0].position != self.position + 1:
            trimmed = self.changelog.trimmed(self.database)
            raise ReplayError(
                f"the change log of {self.database!r} continues at position {records[0].position} "
                f"but the target has applied {self.position}: records were removed before they were "
                f"applied (retention deleted through {trimmed.through}, txids up to {trimmed.max_txid}, "
                f"{trimmed.unplaced} without a txid or not counted), and the copy snapshot "
                f"{self.stitch.default} does not hold them all; copy the target again: its new snapshot "
                f"holds them, unless a transaction open on the source since before them holds its xmin back"
            )
        skip = self._skip_paused
        if skip is not None:
            if skip.position == records[0].position:
                await self._skip(records[0], skip)  # a lost connection keeps the DBA's decision for the retry
                self._skip_paused = None
                return True
            self._skip_paused = None
        read = len(records)
        records = _cut_around_outside_block(_cut_after_session_settings(self.ddl_queue.cut(records)))
        if not records:
            return False  # held in front of queued DDL
        await self._apply_batch(records)
        self._caught_up = len(records) == read < self.batch_size and self.paused is None
        return True

    # -- a source point (replay/point.py) --------------------------------------------------------

    async def _reach_point(self, request: PointRequest, point: SourcePoint) -> bool:
        """Run the request's work once every record up to the point has settled; False while waiting."""
        through = self.changelog.position_through(self.database, point.last_log_id)
        if through is None:
            return False  # a record prepared before the point is still pending
        count = through - self.position
        records = self.changelog.read_committed(self.database, self.position, count) if count > 0 else []
        if len(records) < count:
            return False  # not durable yet
        if (
            self._skip_paused is not None
            or self.ddl_queue.cut(records) != records
            or _sets_session(records)
            or any(_refuses_block(r) for r in records)
        ):
            # Those need replay's own handling (one at a time, or an operator's decision) first.
            self._points.popleft()
            request.fail("a transaction replay must apply on its own is in the way; take a new snapshot")
            return True
        await self._run_point(request, point, records)
        self._points.popleft()
        return True

    async def _run_point(self, request: PointRequest, point: SourcePoint, records: list[LoggedTransaction]) -> None:
        assert self._session is not None
        session = self._session
        seen = [r for r in records if point.visible(r)]
        unseen = [r for r in records if not point.visible(r)]
        before = Pipeline()
        begin = before.extended("BEGIN")
        guard = self._guard(before)
        seen_plans = [self._plan(before, record, False) for record in seen]
        before.sync()
        self._write_flags()
        status = await session.run(before)
        failure = _first_failure(begin, seen_plans, None, None) or (
            _Failure(guard.error, None, _SETTINGS_INDEX, guard.label) if guard.error is not None else None
        )
        if failure is not None or status != b"T":
            await self._abandon_point(request, f"applying up to the point failed: {_failure_text(failure, status)}")
            return
        try:
            value = await _run_work(session, request.work)
        except TransientApplyError:
            request.fail("the target connection was lost at the point")
            raise
        except Exception as exc:  # the work's own failure must never stop replay
            await self._abandon_point(request, f"the work at the point failed: {exc}")
            return
        after = Pipeline()
        position = None
        if records:
            last = records[-1].position
            assert last is not None
            position = self._store_position(after, last)
        unseen_plans = [self._plan(after, record, False) for record in unseen]
        commit = after.extended("COMMIT")
        after.sync()
        self._write_flags()
        status = await session.run(after)
        failure = _first_failure(None, unseen_plans, position, commit)
        if failure is not None or status != b"I":
            await self._abandon_point(request, f"applying after the point failed: {_failure_text(failure, status)}")
            return
        if records:
            self._committed(sorted(seen_plans + unseen_plans, key=lambda p: p.record.position or 0))
        self.points_run += 1
        self.points_reordered += bool(unseen)
        request.answer(value)

    async def _abandon_point(self, request: PointRequest, reason: str) -> None:
        # Rolled back whole: replay goes on normally and meets (and handles) any refused transaction itself.
        assert self._session is not None
        if self._session.status != b"I":
            await self._session.query("ROLLBACK")
        request.fail(reason)

    async def _apply_batch(self, records: list[LoggedTransaction]) -> None:
        if len(records) == 1 and _refuses_block(records[0]):
            await self._apply_outside_block(records[0])
            return
        plans, failure = await self._execute(records)
        if failure is None:
            self._committed(plans)
            return
        if len(records) == 1:
            await self._refused(records[0], failure)
            return
        # Find the transaction the target refuses: the ones before it are applied (and committed) singly.
        for record in records:
            plans, failure = await self._execute([record])
            if failure is not None:
                await self._refused(record, failure)
                return
            self._committed(plans)

    async def _apply_outside_block(self, record: LoggedTransaction) -> None:
        """A statement that refuses a transaction block (CREATE INDEX CONCURRENTLY, VACUUM, ...): run on its own
        under the source's settings, then its position stored in a transaction of its own.

        A crash between the two runs it again at the restart; the target then refuses it (an index that exists
        already, say) and replay pauses on it, as on any refused transaction, for the DBA to skip.
        """
        session = self._session
        assert session is not None
        if await read_position(session, self.database, self._target_facts) != self.position:
            raise TransientApplyError(
                f"the applied position on the target is not {self.position}; another replay connection "
                f"committed meanwhile; reading it again"
            )
        tx = record.transaction
        planned = _Planned(record, in_snapshot=False)
        failure: _Failure | None = None
        names = [name for name, _ in tx.settings]
        try:
            if tx.settings:
                # Session-wide for the moment (no transaction holds a SET LOCAL here), put back below.
                pipeline = Pipeline()
                sql, slot = _set_config(pipeline, tx.settings, local=False, label="session settings")
                pipeline.sync()
                await session.run(pipeline)
                if slot.error is not None:
                    failure = _Failure(slot.error, planned, _SETTINGS_INDEX, sql)
            skip_ddl = self.ddl_queue.skips_ddl_of(record.position)
            for index, statement in enumerate(tx.statements):
                if failure is not None:
                    break
                if skip_ddl and changes_schema(statement):
                    continue  # SKIP QUEUED DDL: applied on the target by hand
                sql = self.adapted(statement.sql)
                # One Execute, then Sync: an implicit transaction of its own, which these statements accept.
                pipeline = Pipeline()
                slot = pipeline.extended(sql, statement.params, statement.param_formats, statement.param_types)
                pipeline.sync()
                planned.slots.append((index, sql, slot))
                await session.run(pipeline)
                if slot.error is not None:
                    failure = _Failure(slot.error, planned, index, sql)
        finally:
            if names and session.status == b"I":
                await session.query(
                    "SELECT set_config(name, reset_val, false) FROM pg_settings WHERE name IN ("
                    + ", ".join(_literal(n) for n in names)
                    + ")"
                )
        if failure is not None:
            await self._refused(record, failure)
            return
        _, failure = await self._execute([record], skip_all=True)  # the position, guarded, in its own transaction
        if failure is not None:
            raise TargetRefusedError(
                f"the target refused to record position {record.position} of {self.database!r}: {failure.error}"
            )
        self._committed([planned])

    async def _execute(
        self,
        records: list[LoggedTransaction],
        *,
        skip_all: bool = False,
    ) -> tuple[list[_Planned], _Failure | None]:
        """One target transaction for `records`; on failure it is rolled back and the first error returned."""
        assert self._session is not None
        pipeline = Pipeline()
        begin = pipeline.extended("BEGIN")
        guard = self._guard(pipeline)
        last = records[-1].position
        assert last is not None
        position = self._store_position(pipeline, last)
        plans = [self._plan(pipeline, record, skip_all) for record in records]
        commit = pipeline.extended("COMMIT")
        pipeline.sync()
        self._write_flags()
        status = await self._session.run(pipeline)
        failure = _first_failure(begin, plans, position, commit)
        if (failure is not None or guard.error is not None) and status != b"I":
            await self._session.query("ROLLBACK")
        if guard.error is not None and guard.error.sqlstate != POSITION_MOVED:
            raise TargetRefusedError(
                f"the target refused pgleap's position check: {guard.error}; check that the "
                f"target login may create and use schema pgleap"
            )
        if guard.error is not None:
            raise TransientApplyError(
                f"the applied position on the target is not {self.position} ({guard.error}); "
                f"another replay connection committed meanwhile; reading it again"
            )
        if failure is None and status != b"I":
            raise TransientApplyError(f"the target is in transaction state {status!r} after COMMIT; reconnecting")
        return plans, failure

    def _guard(self, pipeline: Pipeline) -> Slot:
        """pgleap's check that the target's applied position is still the one this replayer read."""
        return pipeline.extended(
            GUARD_SQL,
            (self.database.encode(), str(self.position).encode()),
            (),
            POSITION_PARAM_TYPES,
            label="check the applied position",
        )

    def _store_position(self, pipeline: Pipeline, last: int) -> Slot:
        """The upsert of the applied position, in the transaction of the changes it covers (I4).

        It goes first, before those changes: a replayed SET LOCAL ROLE (or statement_timeout, ...) holds to
        the end of the transaction, and pgleap's own write must not run under the application's settings.
        """
        return pipeline.extended(
            self._store_sql,
            (self.database.encode(), str(last).encode()),
            (),
            POSITION_PARAM_TYPES,
            label="store the applied position",
        )

    async def _learn_majors(self, target_num: int) -> None:
        """The two servers' versions, for the version adapters (once: a server's major does not change)."""
        if self._majors is not None and self._majors[1] == target_num:
            return
        try:
            source = await TargetSession.open(self.source, self.connect_timeout)
            try:
                source_num = await server_version_num(source)
            finally:
                source.close()
        except Exception as exc:  # replay does not need the source; only the adapters do
            log.warning(
                "replay of %s: the source's version is unknown (%s); statements are not adapted", self.database, exc
            )
            return
        self._majors = (source_num, target_num) if source_num // 10000 != target_num // 10000 else None

    def adapted(self, sql: str) -> str:
        """`sql`, written for the source's major, with the target's names ([auto_upgrade.adapters])."""
        return sql if self._majors is None else self.adapter.adapt(sql, *self._majors)

    def _plan(self, pipeline: Pipeline, record: LoggedTransaction, skip_all: bool) -> _Planned:
        tx = record.transaction
        # Statements already in the copy, by the snapshot of the tables they write (S for all but unlogged ones).
        copied = {i for i, statement in enumerate(tx.statements) if self._in_copy(record, i, statement.sql)}
        if self.stitch.tables and 0 < len(copied) < len(tx.statements):
            # A SET LOCAL, or a set_config() capture kept, is judged by S: it must still run before a later
            # write that is applied, to a table copied at a snapshot of its own. (Not a write naming no table,
            # a DO or a SELECT f(): it would be applied twice.)
            copied = {i for i in copied if not _only_sets(tx.statements[i].sql)}
        if tx.txid is None and not skip_all:
            self._flag_unplaceable(record)
        planned = _Planned(record, in_snapshot=len(copied) == len(tx.statements))
        if planned.in_snapshot or skip_all:
            return planned
        if tx.settings:
            # SET LOCAL semantics: each source transaction's settings hold until the next one's replace them.
            sql, slot = _set_config(pipeline, tx.settings, local=True, label="session settings")
            planned.slots.append((_SETTINGS_INDEX, sql, slot))
        skip_ddl = self.ddl_queue.skips_ddl_of(record.position)
        checks = tx.checks if self.check_runner is not None else ()
        for index, statement in enumerate(tx.statements):
            if checks:
                self._plan_checks(pipeline, planned, index)
            if index in copied or (skip_ddl and changes_schema(statement)):
                continue
            self._flag_unreproduced(record, statement)
            if statement.images is not None:
                # The rows the source wrote, not the statement: keys and defaults as they were there (I3).
                for sql, values in image_statements(decode_image(statement.images)):
                    planned.slots.append((index, sql, pipeline.extended(sql, values, label=statement.sql)))
                continue
            sql = self.adapted(pin_time(statement.sql, tx.source_now) if tx.source_now else statement.sql)
            if statement.copy_data is not None or is_copy_from_stdin(sql):
                slot = pipeline.copy_in(sql, statement.copy_data)
            else:
                slot = pipeline.extended(sql, statement.params, statement.param_formats, statement.param_types)
            planned.slots.append((index, sql, slot))
        if checks:
            self._plan_checks(pipeline, planned, len(tx.statements))
        return planned

    def _plan_checks(self, pipeline: Pipeline, planned: _Planned, before: int) -> None:
        """The reads the source ran after `before` statements of this transaction, each in its own savepoint.

        SAVEPOINT, its settings, Sync, the read, Sync, ROLLBACK TO SAVEPOINT, RELEASE: the Sync after the read
        ends the error skipping of a read the target refuses, and the rollback undoes whatever the read did,
        so the replayed transaction goes on exactly as without it. The Sync before it times the read alone.
        """
        runner = self.check_runner
        assert runner is not None
        for check in planned.record.transaction.checks:
            if check.before != before:
                continue
            try:
                run = runner.run_check(self.database, planned.record, check)
            except Exception as exc:  # result comparison must never stop replay
                log.warning("replay of %s: a recorded read could not be planned (%s)", self.database, exc)
                run = None
            if run is None:
                continue
            own = f"SAVEPOINT {_CHECK_SAVEPOINT}"
            planned.slots.append((_SETTINGS_INDEX, own, pipeline.extended(own)))
            if run.settings:
                # Not one of the transaction's slots: settings the target refuses (a time zone its tzdata lacks)
                # fail the read, which the savepoint undoes, not the transaction.
                _set_config(pipeline, run.settings, local=True, label="read settings")[1].tolerant = True
            start = pipeline.sync()
            read = Slot(check.sql, sink=run.row, tolerant=True)
            sql = self.adapted(check.sql)
            if check.extended:
                pipeline.read(sql, check.params, check.param_formats, check.param_types, read)
            else:
                pipeline.read(sql, (), (), (), read)
            pipeline.sync()
            for own in (f"ROLLBACK TO SAVEPOINT {_CHECK_SAVEPOINT}", f"RELEASE SAVEPOINT {_CHECK_SAVEPOINT}"):
                planned.slots.append((_SETTINGS_INDEX, own, pipeline.extended(own)))
            planned.checks.append(_Check(run, start, read))

    def _in_copy(self, record: LoggedTransaction, index: int, sql: str) -> bool:
        txid = record.transaction.txid
        if txid is None:
            return False  # no probe answer: applying it is the only way it is not lost; verification checks it
        if not self.stitch.tables:
            return self.snapshot.visible(txid)
        infos = classify(sql)
        relations = self._indirect.widen(touched_relations(sql), _calls(infos))
        snapshots = self.stitch.all_for(relations)
        if EVERY_TABLE in relations or any(_writes_unnamed_tables(info) for info in infos):
            # SELECT f(), DO, TRUNCATE ... CASCADE: it may write any table, copied at any of the snapshots.
            snapshots = {self.stitch.default, *self.stitch.tables.values()}
            relations = tuple(dict.fromkeys((*relations, EVERY_TABLE)))
        seen = {s.visible(txid) for s in snapshots}
        if len(seen) == 1:  # one snapshot, or every one of those copies holds it, or none does: no question
            return seen.pop()
        # In some of the tables' copies and not in others: one statement cannot be stitched exactly.
        assert record.position is not None
        reason = f"statement {index} of txid {txid} writes tables copied at different snapshots"
        self._flag(relations, record.position, reason, required=True)
        return self.snapshot.visible(txid)

    def _flag(self, tables: tuple[str, ...], position: int, reason: str, *, required: bool = False) -> None:
        """Flag `tables` for re-sync when the planned batch is sent (one journal write per batch); `required`:
        the target may lack or repeat a transaction there, and cutover waits for the re-sync."""
        for table in tables:
            flagged = self._flags.get(table)
            if flagged is None:
                self._flags[table] = (position, reason, required)
            else:
                self._flags[table] = (max(position, flagged[0]), flagged[1], required or flagged[2])

    def _write_flags(self) -> None:
        # Before the target sees the batch: a crash after its COMMIT must not lose them (more is harmless).
        if self._flags:
            flags, self._flags = self._flags, {}
            self.journal.mark_resync_all(self.database, flags)

    def _flag_unreproduced(self, record: LoggedTransaction, statement: CapturedStatement) -> None:
        """Flag the tables a statement writes when the target may end up with other values than the source.

        Its triggers fire again there (row images included), or, replayed as SQL, it computes values or picks
        rows the target computes otherwise ('now' read as a time among them): the command tags agree all the same.
        """
        sql = statement.sql
        infos = classify(sql) if statement.images is None else ()
        unrepeatable = bool(infos) and (
            any(info.unrepeatable or (info.calls and not self._volatile.isdisjoint(info.calls)) for info in infos)
            or reads_the_clock_as_input(sql, statement.params, statement.param_types)
        )
        defaults = bool(self._defaulted) and any(_fills_defaults(info) for info in infos)
        if not (unrepeatable or defaults or self._triggered):
            return  # the common case: nothing more to read from the statement
        relations = touched_relations(sql)
        position = record.position
        assert position is not None
        triggered = named_among(relations, self._triggered)
        if triggered:
            self._flag(triggered, position, f"position {position} wrote it, and its triggers fired again")
        if unrepeatable:
            self._flag(
                relations,
                position,
                f"position {position} ran a statement the target may compute otherwise ({sql[:80]!r})",
            )
        defaulted = named_among(relations, self._defaulted) if defaults else ()
        if defaulted:
            reason = f"position {position} was replayed as a statement, and the target computed its defaults again"
            self._flag(defaulted, position, reason)

    def _flag_unplaceable(self, record: LoggedTransaction) -> None:
        """A record without a txid captured while the copy ran: applied, and its tables flagged for re-sync.

        Nothing tells whether it committed before S (then the copy holds it, and applying it doubles it) or
        after; applying it loses nothing, and the re-sync makes its tables right either way.
        """
        if self.copied_until is None or record.transaction.captured_at >= self.copied_until:
            return
        assert record.position is not None
        tables = self._reached_tables(record)
        reason = f"position {record.position} has no txid and was captured while the copy ran: it may be applied twice"
        self._flag(tables, record.position, reason, required=True)

    def _reached_tables(self, record: LoggedTransaction) -> tuple[str, ...]:
        """The tables the transaction names (touched_tables) and what writing them changed too (indirect.py)."""
        calls = (f for statement in record.transaction.statements for f in _calls(classify(statement.sql)))
        return self._indirect.widen(touched_tables(record), calls)

    def _committed(self, plans: list[_Planned]) -> None:
        divergences = []
        for planned in plans:
            tx, position = planned.record.transaction, planned.record.position
            assert position is not None
            if planned.in_snapshot:
                self.skipped_in_snapshot += 1
                continue
            self.applied += 1
            for index, sql, target_tag in _statement_tags(planned):
                source_tag = tx.statements[index].tag
                if source_tag and target_tag is not None and target_tag != source_tag:
                    divergences.append(Divergence(self.database, position, tx.txid, index, sql, source_tag, target_tag))
        last = plans[-1].record.position
        assert last is not None
        self.position = last
        self.ddl_queue.applied_through(last)
        self._rate.add(len(plans))
        for planned in plans:
            for check in planned.checks:
                # Judged only now that the transaction around it committed (a batch retried runs it again).
                if not check.read.answered:
                    continue
                try:
                    check.run.done(check.read.error, max(0.0, check.read.answered_at - check.start.answered_at))
                except Exception as exc:  # result comparison must never stop replay
                    log.warning("replay of %s: a recorded read could not be judged (%s)", self.database, exc)
        if divergences:
            # Written after the COMMIT: a crash in between loses these records (verification still finds the
            # table differences); a retry after a failed COMMIT records them again under the same key.
            self.journal.record_divergences(divergences)
            self.divergence_count += len(divergences)
            for d in divergences:
                log.warning(
                    "replay of %s: divergence at position %d (txid %s): %r gave %r on the source, %r on the target",
                    self.database,
                    d.position,
                    d.txid,
                    d.statement,
                    d.source_tag,
                    d.target_tag,
                )

    # -- refused transactions ---------------------------------------------------------------

    async def _refused(self, record: LoggedTransaction, failure: _Failure) -> None:
        if failure.planned is None and failure.statement != "COMMIT":
            # pgleap's own BEGIN or position upsert failed: nothing about the transaction is at fault.
            raise TargetRefusedError(
                f"the target refused pgleap's {failure.statement!r} while applying position "
                f"{record.position} of {self.database!r}: {failure.error}; check that the "
                f"target login may create and write schema pgleap"
            )
        tx = record.transaction
        assert record.position is not None
        sqlstate = failure.error.sqlstate
        error = ApplyError(
            self.database,
            record.position,
            tx.txid,
            failure.statement_index,
            failure.statement,
            sqlstate,
            _error_text(failure.error),
            classify_sqlstate(sqlstate),
            action="paused" if self.on_apply_error == "pause" or blames_target(sqlstate) else "skipped",
        )
        if error.action == "paused":
            # A target out of space, memory or order fails every transaction after this one too: skipping
            # would empty the log into re-sync flags (and lose its DDL), so it pauses whatever on_apply_error says.
            self.journal.record_error(error)
            self.paused = error
            log.error(
                "replay of %s paused at position %d (txid %s): the target refused %r: %s [%s]; fix the target "
                "and resume, or resume with skip to skip it and re-sync its tables",
                self.database,
                error.position,
                error.txid,
                error.statement,
                error.message,
                error.kind.value,
            )
            return
        await self._skip(record, error)

    async def _skip(self, record: LoggedTransaction, error: ApplyError) -> None:
        """Move the position past a refused transaction, recording it and flagging its tables for re-sync."""
        tables = self._reached_tables(record)
        assert record.position is not None
        skipped = ApplyError(
            error.database,
            error.position,
            error.txid,
            error.statement_index,
            error.statement,
            error.sqlstate,
            error.message,
            error.kind,
            "skipped",
            tables,
            error.recorded_at,
        )
        # Recorded before the position moves, so the skip is never invisible; the flag first, so that whoever
        # sees the skipped error (SHOW UPGRADE ERRORS, a test) sees its table flagged too.
        self.journal.mark_resync(
            self.database,
            tables,
            record.position,
            f"transaction txid {record.transaction.txid} skipped: {error.message}",
            required=True,
        )
        self.journal.record_error(skipped)
        _, failure = await self._execute([record], skip_all=True)
        if failure is not None:
            raise TargetRefusedError(
                f"the target refused to record position {record.position} of {self.database!r}: {failure.error}"
            )
        self.position = record.position
        self.skipped_on_error += 1
        self._rate.add(1)
        log.error(
            "replay of %s skipped position %d (txid %s), refused with %s: %s; tables to re-sync: %s",
            self.database,
            record.position,
            record.transaction.txid,
            error.sqlstate,
            error.message,
            ", ".join(tables) or "unknown (verify every table)",
        )


def _visible_prefix(records: list[LoggedTransaction], point: SourcePoint) -> list[LoggedTransaction]:
    """The records before the first one the source point does not see."""
    for i, record in enumerate(records):
        if not point.visible(record):
            return records[:i]
    return records


def _sets_session(records: list[LoggedTransaction]) -> bool:
    return any(_record_sets_session(r) for r in records)


def _record_sets_session(record: LoggedTransaction) -> bool:
    """Whether a statement of the transaction changes session state (SET, RESET, PREPARE, ...)."""
    return any(info.kind is Kind.SESSION for s in record.transaction.statements for info in classify(s.sql))


async def _run_work(session: TargetSession, work: Work) -> object:
    """`work` under pgleap's WORK_SETTINGS, restoring afterwards what the replayed transactions had set."""
    names = list(WORK_SETTINGS)
    saved = (await session.query("SELECT " + ", ".join(f"current_setting('{n}')" for n in names)))[0]
    await session.query(
        "SELECT " + ", ".join(f"set_config('{n}', {_literal(v)}, true)" for n, v in WORK_SETTINGS.items())
    )
    value = await work(session)
    restore = (f"set_config('{n}', {_literal(v)}, true)" for n, v in zip(names, saved, strict=True))
    await session.query("SELECT " + ", ".join(restore))
    return value


def _failure_text(failure: _Failure | None, status: bytes) -> str:
    return str(failure.error) if failure is not None else f"transaction status {status.decode()}"


def _set_config(
    pipeline: Pipeline, settings: Sequence[tuple[str, str]], *, local: bool, label: str
) -> tuple[str, Slot]:
    """One SELECT of set_config() for each (name, value), values as parameters; its text and slot."""
    sql, params, types = settings_statement(settings, local=local)
    return sql, pipeline.extended(sql, params, (), types, label=label)


def _literal(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


# CALL and DO may COMMIT from 11 on (so capture does not wrap them there), but most do not: they stay in the
# batch's transaction, with their position, so a retry never runs their writes twice.
_IN_BLOCK_ALL_THE_SAME = frozenset(["CallStmt", "DoStmt"])


def _refuses_block(record: LoggedTransaction) -> bool:
    """Whether the transaction is a statement the target refuses inside a transaction block (CREATE INDEX
    CONCURRENTLY, VACUUM, ...)."""
    tx = record.transaction
    # Capture logs those without a probe, so without a txid: the cheap test first, for every other record.
    return tx.txid is None and any(
        info.refuses_block and info.command not in _IN_BLOCK_ALL_THE_SAME
        for s in tx.statements
        for info in classify(s.sql)
    )


def _only_sets(sql: str) -> bool:
    """A statement that changes settings and nothing else."""
    return is_settings_statement(sql) or all(info.kind is Kind.SESSION for info in classify(sql))


def _cut_around_outside_block(records: list[LoggedTransaction]) -> list[LoggedTransaction]:
    """A transaction that must run outside a transaction block goes alone; the batch before it stops short."""
    for i, record in enumerate(records):
        if _refuses_block(record):
            return records[: max(i, 1)]
    return records


def _cut_after_session_settings(records: list[LoggedTransaction]) -> list[LoggedTransaction]:
    """The batch up to the first transaction that SETs something (included).

    A source transaction's SET LOCAL would otherwise stay in force for the source transactions after it
    in the same target transaction; only the captured settings are set again for each.
    """
    for i, record in enumerate(records):
        if _record_sets_session(record):
            return records[: i + 1]
    return records


_DEFAULT_WORD = re.compile(r"\bdefault\b", re.IGNORECASE)
_FILLING_DEFAULTS = frozenset(["InsertStmt", "CopyStmt", "MergeStmt", "SelectStmt"])  # SELECT: a writable CTE


def _fills_defaults(info: StatementInfo) -> bool:
    """Whether a write, replayed as a statement, may have the target compute column defaults."""
    command = info.command
    if command in _FILLING_DEFAULTS:
        return info.writes
    return command == "UpdateStmt" and _DEFAULT_WORD.search(info.text) is not None


def touched_relations(sql: str) -> tuple[str, ...]:
    """Relations one statement writes, as written in it (empty when none can be named)."""
    return tuple(dict.fromkeys(r for info in classify(sql) for r in info.relations if r))


def touched_tables(record: LoggedTransaction) -> tuple[str, ...]:
    """Relations the transaction's statements write, as written in them, and EVERY_TABLE among them when one
    writes without naming its tables (`SELECT f()`, CALL, DO, an unparseable statement)."""
    names: dict[str, None] = {}
    for statement in record.transaction.statements:
        for info in classify(statement.sql):
            if _writes_unnamed_tables(info):
                names[EVERY_TABLE] = None
            names.update(dict.fromkeys(r for r in info.relations if r))
    return tuple(names)


def _calls(infos: tuple[StatementInfo, ...]) -> list[str]:
    """Functions capture knows nothing of that the writes among `infos` call."""
    return [f for info in infos if info.kind is Kind.WRITE for f in info.calls]


def _writes_unnamed_tables(info: StatementInfo) -> bool:
    if "" in info.relations or (info.kind is Kind.WRITE and not info.relations):
        return True  # unparseable, a target it could not name, TRUNCATE ... CASCADE
    if info.kind is not Kind.MAYBE_WRITE:
        return False
    # SELECT f(), CALL, DO, EXECUTE: unless every function it calls is known to write no table.
    return not info.calls or any(f not in WRITES_NO_TABLE and f not in UNREPEATABLE_FUNCTIONS for f in info.calls)


def _statement_tags(planned: _Planned) -> list[tuple[int, str, str | None]]:
    """(statement index, what was sent, the target's tag) per source statement; row images add up their INSERTs."""
    by_index: dict[int, list[tuple[str, Slot]]] = {}
    for index, sql, slot in planned.slots:
        if index >= 0:
            by_index.setdefault(index, []).append((sql, slot))
    tags = []
    for index, sent in by_index.items():
        if planned.record.transaction.statements[index].images is not None:
            tags.append(
                (index, planned.record.transaction.statements[index].sql, combined_tag([s.tag for _, s in sent]))
            )
        else:
            tags.append((index, sent[0][0], sent[0][1].tag))
    return tags


def _first_failure(
    begin: Slot | None, plans: list[_Planned], position: Slot | None, commit: Slot | None
) -> _Failure | None:
    # Answers come in order and the server skips to Sync after an error, so the first error is the cause
    # (a failed COPY, sent as a simple Query, is followed by 25P02 errors that are only consequences).
    if begin is not None and begin.error is not None:
        return _Failure(begin.error, None, _SETTINGS_INDEX, "BEGIN")
    if position is not None and position.error is not None:
        return _Failure(position.error, None, _SETTINGS_INDEX, position.label)
    for planned in plans:
        for index, sql, slot in planned.slots:
            if slot.error is not None:
                return _Failure(slot.error, planned, index, sql)
    if commit is not None and commit.error is not None:
        return _Failure(commit.error, None, _SETTINGS_INDEX, "COMMIT")
    return None


def _error_text(error: ServerError) -> str:
    return error.message + (f" ({error.detail})" if error.detail else "")


async def _wait(stop: asyncio.Event | None, seconds: float) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
