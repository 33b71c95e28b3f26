"""One database's upgrade, driven through its phases inside the pgleap process (START UPGRADE).

initializing: capture on, and every session of the database capturing (a session mid-transaction when
capture started switches at its next boundary; the copy's S must not come before that, or a transaction
committed after S by such a session would be in neither the copy nor the log).
copying: the bulk copy at S (`pgleap copy`'s engine, in a thread of its own so clients keep the loop).
catching_up: replay from S until the lag is under CATCH_UP_LAG.
mirroring: replay follows; every table is verified (and re-synced, per resync_on_error) in rounds; when
every gate of upgrade/gates.py holds, cutover_ready, and back to mirroring when one stops holding.
cut_over (INITIATE CUTOVER): the reverse log is replayed into the source; the clients' error rate is watched,
and past [auto_upgrade.cutover] rollback_error_rate the machine rolls back by itself (upgrade/autorollback.py).

Every transition is persisted with its reason before anything of the next phase happens, so a pgleap
killed in any phase starts that phase again when it restarts (each phase is safe to repeat: the copy
resumes from its chunks, replay from the target's applied position, verification from scratch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgleap.config import CutoverConfig
from pgleap.errors import PgleapError
from pgleap.store.state import StateStore
from pgleap.tasks import cancel_until_done
from pgleap.upgrade.autorollback import SAMPLE_INTERVAL, ErrorWindow, RollbackPolicy, Sample
from pgleap.upgrade.gates import Gate, GateInputs, cutover_gates, describe, shut
from pgleap.upgrade.phases import RESUMED, Phase, check_move
from pgleap.upgrade.switch import SwitchReport, direction, switch

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy

log = logging.getLogger(__name__)

CATCH_UP_LAG = 1.0  # seconds of replay lag below which catching up is over
CUT_OVER_ACTIVITY = "cut over: clients use the target; their writes are logged for the source (rollback)"
CUTOVER_MAX_LAG = 3.0  # the lag gate (the pause itself waits for lag 0, bounded by SWITCH_TIMEOUT)
SESSIONS_WAIT = 60.0  # seconds to wait for every session to capture before the copy
RETRY_AFTER = 5.0  # seconds before a failed phase step is tried again
CANCEL_AGAIN = 1.0  # seconds before a drive task that did not end is cancelled once more


@dataclass(frozen=True)
class UpgradeStatus:
    """A database's upgrade as status shows it."""

    database: str
    phase: str | None
    since: float | None
    reason: str | None
    activity: str  # what the phase is doing now
    gates: list[Gate]
    last_error: str | None
    last_switch: SwitchReport | None


class UpgradeMachine:
    """Drives one database's upgrade: START UPGRADE to cutover_ready by itself; cutover, rollback and complete
    when the operator says."""

    def __init__(self, proxy: Proxy, database: str, store: StateStore) -> None:
        self.proxy = proxy
        self.database = database
        self.store = store
        self.activity = "not started"
        self.last_error: str | None = None
        self.gates: list[Gate] = []
        self.last_switch: SwitchReport | None = None
        self._task: asyncio.Task[None] | None = None
        self._mirroring_since = time.time()  # wall clock: the validation clock is persisted (transitions)
        # One switch at a time: an operator's command and the automatic rollback may come together.
        self._switching = asyncio.Lock()

    @property
    def _cutover(self) -> CutoverConfig:
        return self.proxy.databases[self.database].upgrade.cutover

    @property
    def phase(self) -> Phase | None:
        """The persisted phase."""
        record = self.store.phase(self.database)
        return Phase(record.phase) if record is not None else None

    @property
    def running(self) -> bool:
        """Whether the drive task runs."""
        return self._task is not None and not self._task.done()

    def start(self) -> str:
        """Start (or, after a restart, resume) the upgrade; returns a note."""
        phase = self.phase
        if phase in (None, Phase.ROLLED_BACK):
            self._move(Phase.INITIALIZING, "START UPGRADE")
            note = "started"
        elif phase in RESUMED:
            note = f"resuming in phase {phase.value}"
        else:
            raise PgleapError(f"database {self.database}: the upgrade is {phase.value}; nothing to start")
        self._start_task()
        return f"database {self.database}: upgrade {note}"

    def _start_task(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._drive(), name=f"upgrade:{self.database}")

    async def cutover(self, *, force: bool = False) -> SwitchReport:
        """Move the clients to the target (every gate must hold unless `force`); the reverse log starts."""
        async with self._switching:
            phase = self.phase
            if phase is Phase.MIRRORING and force:
                reason = "INITIATE CUTOVER FORCE, gates overridden: " + describe(shut(self.gates))
            elif phase is Phase.CUTOVER_READY:
                self._judge_gates()
                closed = shut(self.gates)
                if closed and not force:
                    raise PgleapError("cutover refused: " + describe(closed))
                force = bool(closed)  # forcing past no shut gate overrides nothing, not a re-sync required later
                reason = "INITIATE CUTOVER" + (" FORCE" if closed else "")
            else:
                where = phase.value if phase else "not started"
                gates = describe(shut(self.gates)) or "none judged yet"
                raise PgleapError(f"cutover refused: the upgrade is {where}, not cutover_ready (gates shut: {gates})")
            check_move(phase, Phase.CUT_OVER)
            await self.stop()  # mirroring ends; replay and verification of the old direction stop with the switch
            try:
                report = await switch(self.proxy, self.database, "target", self._cutover.switch_timeout, force=force)
            except BaseException:
                self._start_task()  # not switched: mirroring goes on
                raise
            self.last_switch = report
            self._move(Phase.CUT_OVER, f"{reason}; clients on the target after a {report.pause_seconds:.3f}s pause")
            self.activity = CUT_OVER_ACTIVITY
            self._start_task()  # the watch of the error rate after cutover
            return report

    async def complete(self) -> str:
        """End the fallback period: the reverse log stops, capture stops, the source is no longer written."""
        async with self._switching:
            check_move(self.phase, Phase.COMPLETE)
            await self.stop()  # the watch of the error rate: there is no going back now
            replay = self.proxy.replay
            reverse = direction(self.proxy.databases[self.database].upgrade, "target").database
            if replay is not None and replay.running(reverse):
                await replay.stop(reverse)
            await self.proxy.stop_capture([self.database])  # only this upgrade's
            self._move(Phase.COMPLETE, "COMPLETE UPGRADE: the source is retired")
            self.activity = "complete: clients use the target; pgleap no longer writes to the source"
            return f"database {self.database}: upgrade complete; the source is no longer written by pgleap"

    async def rollback(self, reason: str) -> str:
        """Before cutover: stop driving, stop replay and capture; the target is left as it is for inspection.
        After cutover: move the clients back to the source once the reverse log is applied; mirroring again."""
        asked_in = self.phase
        async with self._switching:
            phase = self.phase
            if asked_in is Phase.CUT_OVER and phase is not Phase.CUT_OVER:
                # The automatic rollback came first: what was asked is done (not an abandon of the upgrade).
                record = self.store.phase(self.database)
                return f"database {self.database}: already back on the source ({record.reason if record else ''})"
            if phase is Phase.CUT_OVER:
                await self.stop()  # the watch of the error rate
                try:
                    report = await self._switch_back(reason)
                finally:
                    self._start_task()  # mirroring again; or, not switched, still cut over and watched
                return f"database {self.database}: rolled back to the source in a {report.pause_seconds:.3f}s pause"
            check_move(phase, Phase.ROLLED_BACK)
            await self.stop()
            if self.proxy.replay is not None and self.proxy.replay.running(self.database):
                await self.proxy.replay.stop(self.database)
            await self.proxy.stop_capture([self.database])  # only this upgrade's
            self._move(Phase.ROLLED_BACK, reason)
            self.activity = "rolled back; clients use the source as before, the target is left for inspection"
            return f"database {self.database}: rolled back from {phase.value if phase else 'nothing'}"

    async def _switch_back(self, reason: str) -> SwitchReport:
        """After cutover: clients back to the source (the reverse log applied first); mirroring again."""
        report = await switch(self.proxy, self.database, "source", self._cutover.switch_timeout)
        self.last_switch = report
        self._move(Phase.MIRRORING, f"{reason}: clients back on the source after a {report.pause_seconds:.3f}s pause")
        return report

    async def stop(self) -> None:
        """Stop the drive task (the phase stays as persisted: a later start resumes it)."""
        if self._task is not None:
            await cancel_until_done(self._task, CANCEL_AGAIN)
            self._task = None

    def status(self) -> UpgradeStatus:
        """Phase, since when and why, what it is doing, the gates."""
        record = self.store.phase(self.database)
        return UpgradeStatus(
            self.database,
            record.phase if record else None,
            record.since if record else None,
            record.reason if record else None,
            self.activity,
            list(self.gates),
            self.last_error,
            self.last_switch,
        )

    # -- the drive ---------------------------------------------------------------------------

    def _reconcile_route(self) -> None:
        """A crash between a switch (route persisted) and its phase move: the route is the truth."""
        routed = self.store.route(self.database)
        phase = self.phase
        if routed is not None and routed[0] == "target" and phase in (Phase.MIRRORING, Phase.CUTOVER_READY):
            self._move(Phase.CUT_OVER, "clients were moved to the target just before a restart")
        elif routed is not None and routed[0] == "source" and phase is Phase.CUT_OVER:
            self._move(Phase.MIRRORING, "clients were moved back to the source just before a restart")

    async def _drive(self) -> None:
        self._reconcile_route()
        while True:
            phase = self.phase
            try:
                if phase is Phase.INITIALIZING:
                    await self._initialize()
                elif phase is Phase.COPYING:
                    await self._copy()
                elif phase is Phase.CATCHING_UP:
                    await self._catch_up()
                elif phase in (Phase.MIRRORING, Phase.CUTOVER_READY):
                    await self._mirror()
                elif phase is Phase.CUT_OVER:
                    self._reverse_replay_started()
                    await self._watch_error_rate()
                else:
                    return
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the phase is retried; clients are never affected (I5)
                self.last_error = f"{phase.value if phase else 'start'}: {exc}"
                log.error("upgrade of %s: %s; retrying in %.0fs", self.database, self.last_error, RETRY_AFTER)
                await asyncio.sleep(RETRY_AFTER)

    async def _initialize(self) -> None:
        database = self.proxy.databases[self.database]
        if database.upgrade.target is None:
            raise PgleapError(f"database {self.database} has no target configured (target_host, target_port)")
        if database.capture is None:
            self.activity = "starting capture"
            self.proxy.start_capture()
        self.activity = "waiting for every session to capture"
        deadline = time.monotonic() + SESSIONS_WAIT
        while (left := self._sessions_not_capturing()) > 0:
            if time.monotonic() > deadline:
                raise PgleapError(
                    f"{left} sessions of {self.database} have not reached a transaction boundary within "
                    f"{SESSIONS_WAIT:.0f}s of capture starting; the copy waits for them (long transactions?)"
                )
            await asyncio.sleep(0.1)
        self._move(Phase.COPYING, "capture is on for every session")

    def _sessions_not_capturing(self) -> int:
        database = self.proxy.databases[self.database]
        return sum(
            1
            for s in self.proxy.sessions.values()
            if s.database is database and s.forwarder is not None and s.forwarder.capture is not database.capture
        )

    async def _copy(self) -> None:
        run = self.store.run(self.database)
        if run is None or run.status != "done":
            self.activity = "copying (SHOW UPGRADE TABLES)"
            report = await asyncio.to_thread(self._copy_in_thread)
            reason = f"copy done at S = {report.snapshot}: {report.rows} rows in {report.seconds:.1f}s"
        else:
            reason = f"copy run {run.run_id} was already done at S = {run.snapshot}"
        self._move(Phase.CATCHING_UP, reason)

    def _copy_in_thread(self) -> Any:
        from pgleap.upgrade.copy import CopyJob
        from pgleap.upgrade.copy.model import copy_options

        upgrade = self.proxy.databases[self.database].upgrade
        options = copy_options(upgrade.sync)
        # Its own state store connection and event loop: the copy must not load the clients' loop.
        store = StateStore(self.store.path)
        try:
            return asyncio.run(CopyJob(upgrade, store, options).run())
        finally:
            store.close()

    async def _catch_up(self) -> None:
        replay = self._replay_started()
        self.activity = "replaying what was logged during the copy"
        while True:
            report = replay.report(self.database)
            if report is not None and report.stopped_error:
                raise PgleapError(f"replay stopped: {report.stopped_error}")
            lag = report.lag_seconds if report is not None else None
            if lag is not None and lag <= CATCH_UP_LAG:
                break
            await asyncio.sleep(0.2)
        self._move(Phase.MIRRORING, f"replay caught up (lag {lag:.2f}s)")

    def _replay_started(self) -> Any:
        replay = self.proxy.replay
        if replay is None or not replay.running(self.database):
            self.proxy.start_replay()
            replay = self.proxy.replay
        return replay

    def _reverse_replay_started(self) -> None:
        """After a restart in cut_over: the reverse log is applied to the source again, from the switch's snapshot."""
        upgrade = direction(self.proxy.databases[self.database].upgrade, "target")
        replay = self.proxy.replay
        if replay is not None and replay.running(upgrade.database):
            return
        routed = self.store.route(self.database)
        if routed is None or routed[0] != "target":
            raise PgleapError(f"database {self.database} is cut over but its route was not recorded")
        self.proxy.start_replay(names=[self.database])
        self.activity = CUT_OVER_ACTIVITY

    async def _watch_error_rate(self) -> None:
        """While cut over: sample the clients' queries and errors; past the policy's threshold, roll back.
        Returns once rolled back (the drive goes on in mirroring)."""
        window = ErrorWindow()  # from this moment: errors from before the cutover (or restart) do not count
        while True:
            policy = RollbackPolicy.from_config(self._cutover)  # read each time: a reload may change it
            stats = self.proxy.databases[self.database].stats
            rate = window.add(Sample(time.monotonic(), stats.queries, stats.errors), policy.window)
            self.activity = f"{CUT_OVER_ACTIVITY}; {policy.describe(rate)}"
            if policy.triggered(rate):
                reason = policy.reason(rate)
                log.warning("upgrade of %s: %s; rolling back", self.database, reason)
                async with self._switching:
                    if self.phase is not Phase.CUT_OVER:
                        return  # an operator's command came first
                    try:
                        await self._switch_back(reason)
                    except PgleapError as exc:  # retried by the drive, with a fresh window
                        raise PgleapError(f"automatic rollback failed: {exc}") from exc
                return
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _mirror(self) -> None:
        validation = self.proxy.databases[self.database].upgrade.validation
        interval = max(1.0, min(300.0, validation.validation_duration / 4))
        # The validation clock runs from the last move into mirroring, as persisted: a restart (or a cutover
        # that was refused or aborted) does not start it again.
        self._mirroring_since = self._mirroring_started()
        while True:
            self._replay_started()
            self.activity = "verifying every table"
            await self.proxy.verifier().verify(self.database)
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline:
                self.activity = "mirroring: replay follows, reads are compared"
                self._judge_gates()
                await asyncio.sleep(0.5)

    def _judge_gates(self) -> None:
        upgrade = self.proxy.databases[self.database].upgrade
        reports = [r for (db, _), r in self.proxy.verifier().last_reports().items() if db == self.database]
        replay = self.proxy.replay.report(self.database) if self.proxy.replay is not None else None
        validator = getattr(self.proxy, "validator", None)
        metrics = validator.metrics() if validator is not None else None
        self.gates = cutover_gates(
            GateInputs(
                mirroring_seconds=max(0.0, time.time() - self._mirroring_since),
                validation_duration=upgrade.validation.validation_duration,
                error_threshold=upgrade.validation.error_threshold,
                error_rate=getattr(metrics, "error_rate_window", None) if getattr(metrics, "total", 0) else None,
                compare_results=upgrade.validation.compare_results,
                verified_tables=len(reports),
                differing_tables=sum(1 for r in reports if not r.clean),
                lag_seconds=replay.lag_seconds if replay is not None else None,
                max_lag_seconds=CUTOVER_MAX_LAG,
                must_resync=tuple(self.proxy.replay.journal.required_resyncs(self.database))
                if self.proxy.replay is not None
                else (),
            )
        )
        closed = shut(self.gates)
        phase = self.phase
        if phase is Phase.MIRRORING and not closed:
            self._move(Phase.CUTOVER_READY, "every gate holds: " + "; ".join(g.detail for g in self.gates))
        elif phase is Phase.CUTOVER_READY and closed:
            self._move(Phase.MIRRORING, "gate shut: " + describe(closed))

    def _mirroring_started(self) -> float:
        """When the upgrade last moved into mirroring (wall clock, from the persisted transitions)."""
        for transition in reversed(self.store.transitions(self.database)):
            if transition.to_phase == Phase.MIRRORING.value:
                return transition.at
        return time.time()

    def _move(self, to: Phase, reason: str) -> None:
        check_move(self.phase, to)
        self.store.set_phase(self.database, to.value, reason)
        if to is Phase.MIRRORING:
            self._mirroring_since = time.time()  # the validation clock starts again
        log.info("upgrade of %s: now %s (%s)", self.database, to.value, reason)
        self.proxy.read_shift_changed(self.database)  # leaving mirroring ends the gradual shift
