"""Replay inside the pgleap process: one Replayer per database, following the log capture writes.

The change log is locked by the process that opened it, so replay runs where capture runs, as tasks in
the proxy's event loop. Each database starts from the copy's snapshot S, read from the state store
(`pgleap copy` records it); replay refuses to start without one, because applying the log on a
target that was not copied at S would miss or double transactions. Status and metrics read a sample
taken every `lag_interval` seconds in the loop, so the metrics thread never touches a Replayer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pgleap.config import UpgradeConfig
from pgleap.store.changelog import ChangeLog
from pgleap.store.state import StateStore
from pgleap.tasks import cancel_until_done
from pgleap.upgrade.replay.applier import Replayer, ReplayStatus
from pgleap.upgrade.replay.ddl_queue import Decision
from pgleap.upgrade.replay.errors import ReplayError
from pgleap.upgrade.replay.journal import ApplyJournal
from pgleap.upgrade.replay.lag import ReplayLag

log = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0  # seconds STOP REPLAY lets a batch finish before cancelling it (safe: see applier)


@dataclass(frozen=True)
class StartPoint:
    """Where replay of one database starts: S, and the snapshots of tables the copy read apart from S."""

    snapshot: str
    table_snapshots: dict[str, str] = field(default_factory=dict)
    origin: str = "the snapshot given"  # or "S of copy run 3"
    copied_until: float | None = None  # when that copy finished
    target_oid: int | None = None  # the target database that copy created (or filled)


def copy_start_point(store: StateStore | None, database: str) -> StartPoint:
    """S of the finished copy of `database`, from the state store; ReplayError saying what to do otherwise."""
    run = store.run(database) if store is not None else None
    if store is None or run is None or run.snapshot is None:
        raise ReplayError(
            f"database {database!r}: no copy snapshot S is recorded in the state store, so replay cannot "
            f"tell which logged transactions the target already holds; run `pgleap copy` first "
            f"(or give the snapshot the target was copied at explicitly)"
        )
    if run.status != "done":
        # Rows applied before the copy wrote their table would collide with the copied ones.
        raise ReplayError(
            f"database {database!r}: copy run {run.run_id} is {run.status}, not done; replay starts once "
            f"the copy has finished: run `pgleap copy` again to finish it"
        )
    tables = {
        f"{c.schema_name}.{c.table_name}": c.snapshot
        for c in store.chunks(database)
        if c.snapshot is not None and c.snapshot != run.snapshot
    }
    return StartPoint(run.snapshot, tables, f"S of copy run {run.run_id}", run.finished_at, run.target_oid)


@dataclass(frozen=True)
class ReplayReport:
    """One database's replay, as status and metrics show it."""

    database: str
    running: bool
    status: ReplayStatus  # counters of the current (or last) run
    lag: ReplayLag
    apply_errors: int  # apply errors recorded in the journal (paused or skipped transactions)
    applied_total: int  # applied since pgleap started, over every run
    divergences_total: int
    stopped_error: str | None  # why the run ended, when it ended on an error

    @property
    def lag_seconds(self) -> float | None:
        """The lag in seconds while replay runs and knows where the target stands; None otherwise."""
        return self.lag.seconds if self.running and self.lag.position_known else None


@dataclass
class _Run:
    replayer: Replayer
    origin: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    sampler: asyncio.Task[None] | None = None
    error: str | None = None
    sample: ReplayReport | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class ReplayService:
    """Runs one Replayer per database in the current event loop, on one change log."""

    def __init__(
        self,
        changelog: ChangeLog,
        journal: ApplyJournal,
        *,
        lag_interval: float = 1.0,
        replayer_options: dict[str, Any] | None = None,
    ) -> None:
        self.changelog = changelog
        self.journal = journal
        self.lag_interval = lag_interval
        self.replayer_options = replayer_options or {}
        self._runs: dict[str, _Run] = {}
        self._carried: dict[str, tuple[int, int]] = {}  # (applied, divergences) of runs that ended

    def replayer(self, database: str) -> Replayer | None:
        """The Replayer of `database` while its replay runs (verification reads at its points)."""
        run = self._runs.get(database)
        return run.replayer if run is not None and run.running else None

    def running(self, database: str) -> bool:
        """Whether replay of `database` is running."""
        run = self._runs.get(database)
        return run is not None and run.running

    def start_all(
        self, upgrades: Iterable[UpgradeConfig], store: StateStore | None, given: dict[str, str] | None = None
    ) -> list[str]:
        """Start replay of every database with a target; all or nothing: one without S starts none."""
        given = given or {}
        planned: list[tuple[UpgradeConfig, StartPoint]] = []
        notes = []
        for upgrade in upgrades:
            name = upgrade.database
            if self.running(name):
                notes.append(f"database {name}: already replaying")
            elif upgrade.target is None:
                notes.append(f"database {name}: no target configured; not replayed")
            elif name in given:
                planned.append((upgrade, StartPoint(given[name])))
            else:
                planned.append((upgrade, copy_start_point(store, name)))
        # Build every Replayer before starting any, so a bad snapshot or option starts nothing.
        runs = [(u, self._new_run(u, start)) for u, start in planned]
        for upgrade, run in runs:
            self._launch(upgrade.database, run)
            assert upgrade.target is not None
            notes.append(f"database {upgrade.database}: replaying to {upgrade.target.describe()} from {run.origin}")
        return notes

    def _new_run(self, upgrade: UpgradeConfig, start: StartPoint) -> _Run:
        replayer = Replayer(
            upgrade,
            self.changelog,
            start.snapshot,
            journal=self.journal,
            table_snapshots=start.table_snapshots,
            copied_until=start.copied_until,
            target_oid=start.target_oid,
            **self.replayer_options,
        )
        return _Run(replayer, start.origin)

    def _launch(self, database: str, run: _Run) -> None:
        previous = self._runs.get(database)
        if previous is not None:
            applied, divergences = self._carried.get(database, (0, 0))
            status = previous.replayer.status()
            self._carried[database] = (applied + status.applied, divergences + status.divergences)
        self._runs[database] = run
        loop = asyncio.get_running_loop()
        run.task = loop.create_task(self._replay(database, run), name=f"replay:{database}")
        run.sampler = loop.create_task(self._sample(run), name=f"replay-lag:{database}")

    async def _replay(self, database: str, run: _Run) -> None:
        try:
            await run.replayer.run(run.stop)
        except Exception as exc:
            # Replay stops; clients are unaffected (I5). SHOW REPLAY shows why until it is started again.
            run.error = str(exc)
            log.error("replay of %s stopped: %s", database, exc)
        finally:
            run.replayer.close()

    async def _sample(self, run: _Run) -> None:
        while True:
            with contextlib.suppress(Exception):  # a failing read shows as a stale sample, never kills replay
                run.sample = self._report(run)
            if not run.running:
                return
            assert run.task is not None
            await asyncio.wait({run.task}, timeout=self.lag_interval)  # wakes early when replay ends

    async def stop(self, database: str) -> str:
        """Stop replay of `database` after its current batch (cancelled after STOP_TIMEOUT seconds)."""
        run = self._runs.get(database)
        if run is None or not run.running:
            return f"database {database}: not replaying"
        run.stop.set()
        assert run.task is not None
        try:
            await asyncio.wait_for(asyncio.shield(run.task), STOP_TIMEOUT)
        except TimeoutError:
            # Cancelling mid-batch is safe: the applied position commits with the changes it covers.
            await cancel_until_done(run.task, STOP_TIMEOUT)
        if run.sampler is not None:
            await asyncio.wait({run.sampler})
        return f"database {database}: stopped at position {run.replayer.position}"

    async def stop_all(self) -> list[str]:
        """Stop every running replay."""
        return [await self.stop(name) for name in sorted(self._runs) if self.running(name)]

    def resume(self, *, skip: bool) -> list[str]:
        """Continue every replay paused at a refused transaction: retry it, or skip it and flag its tables."""
        notes = []
        for name, run in sorted(self._runs.items()):
            paused = run.replayer.paused
            if paused is not None and run.running:
                run.replayer.resume(skip=skip)
                action = "skipping" if skip else "retrying"
                notes.append(f"database {name}: {action} position {paused.position} (txid {paused.txid})")
        return notes or ["no replay is paused"]

    def decide_ddl(self, decision: Decision) -> list[str]:
        """Release every replay held at queued DDL with the operator's `decision`."""
        notes = []
        for name, run in sorted(self._runs.items()):
            held = run.replayer.ddl_queue.decide(decision)
            if held is not None:
                verb = "applying" if decision is Decision.APPLY else "applying without its DDL"
                notes.append(f"database {name}: {verb} position {held.position} (txid {held.txid})")
        return notes or ["no replay holds queued DDL"]

    def report(self, database: str) -> ReplayReport | None:
        """The replay of `database` now (None if it never started); call from the event loop."""
        run = self._runs.get(database)
        return self._report(run) if run is not None else None

    def sampled(self) -> list[ReplayReport]:
        """The latest sample of every database's replay; safe from any thread (metrics)."""
        return [run.sample for _, run in sorted(self._runs.items()) if run.sample is not None]

    def _report(self, run: _Run) -> ReplayReport:
        replayer = run.replayer
        status = replayer.status()
        applied, divergences = self._carried.get(replayer.database, (0, 0))
        return ReplayReport(
            replayer.database,
            run.running,
            status,
            replayer.lag(),
            len(self.journal.errors(replayer.database)),
            applied + status.applied,
            divergences + status.divergences,
            run.error,
        )

    def close(self) -> None:
        """Close the journal (replay must be stopped)."""
        self.journal.close()
