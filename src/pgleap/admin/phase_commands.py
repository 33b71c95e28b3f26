"""Admin commands of the upgrade's state machine: START UPGRADE, INITIATE CUTOVER [FORCE], ROLLBACK UPGRADE,
COMPLETE UPGRADE, SHOW UPGRADE STATUS and SHOW UPGRADE HISTORY."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pgleap.admin.commands import AdminCommandError, Result, _ts, command, notes_result
from pgleap.errors import PgleapError
from pgleap.proxy.route import READ_SHIFT_ROLE
from pgleap.upgrade.gates import describe, shut

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy
    from pgleap.proxy.session import Session


@command("START UPGRADE")
async def start_upgrade(proxy: Proxy, _session: Session) -> Result:
    """Capture, copy, catch up and mirror every database with a target, with no further command."""
    try:
        notes = proxy.start_upgrade()
    except PgleapError as exc:
        raise AdminCommandError(f"START UPGRADE failed: {exc}") from exc
    return notes_result("START UPGRADE", notes)


@command("ROLLBACK UPGRADE")
async def rollback_upgrade(proxy: Proxy, _session: Session) -> Result:
    """Before cutover: abandon the upgrade (the target is kept). After it: clients back to the source, lossless."""
    if not proxy.upgrades:
        raise AdminCommandError("ROLLBACK UPGRADE: no upgrade has started (START UPGRADE)")
    notes = []
    for name, machine in sorted(proxy.upgrades.items()):
        try:
            notes.append(await machine.rollback("ROLLBACK UPGRADE"))
        except PgleapError as exc:
            raise AdminCommandError(f"ROLLBACK UPGRADE of {name}: {exc}") from exc
    return notes_result("ROLLBACK UPGRADE", notes)


async def _cutover(proxy: Proxy, force: bool) -> Result:
    tag = "INITIATE CUTOVER" + (" FORCE" if force else "")
    if not proxy.upgrades:
        raise AdminCommandError(f"{tag}: no upgrade has started (START UPGRADE)")
    notes = []
    for name, machine in sorted(proxy.upgrades.items()):
        try:
            report = await machine.cutover(force=force)
        except PgleapError as exc:
            raise AdminCommandError(f"{tag} of {name}: {exc}") from exc
        notes.append(f"database {name}: clients on the target after a {report.pause_seconds:.3f}s pause")
    return notes_result(tag, notes)


@command("INITIATE CUTOVER")
async def initiate_cutover(proxy: Proxy, _session: Session) -> Result:
    """Move clients to the target with a short pause, if every gate holds (it names the ones that do not)."""
    return await _cutover(proxy, force=False)


@command("INITIATE CUTOVER FORCE")
async def initiate_cutover_force(proxy: Proxy, _session: Session) -> Result:
    """Move clients to the target even though a gate does not hold (the reasons are logged)."""
    return await _cutover(proxy, force=True)


@command("COMPLETE UPGRADE")
async def complete_upgrade(proxy: Proxy, _session: Session) -> Result:
    """End the fallback period: stop writing the source (no rollback after this)."""
    notes = []
    for name, machine in sorted(proxy.upgrades.items()):
        try:
            notes.append(await machine.complete())
        except PgleapError as exc:
            raise AdminCommandError(f"COMPLETE UPGRADE of {name}: {exc}") from exc
    return notes_result("COMPLETE UPGRADE", notes)


@command("SHOW UPGRADE STATUS")
async def show_upgrade_status(proxy: Proxy, _session: Session) -> Result:
    """Per database: phase and why, what it does, what blocks cutover; capture, replay, validation, verification."""
    columns = [
        "database",
        "phase",
        "phase_since",
        "phase_reason",
        "activity",
        "blocked_by",
        "last_error",
        "routed_to",
        "last_pause_s",
        "read_shift_sessions",
        "capturing",
        "replaying",
        "applied_position",
        "lag_transactions",
        "lag_seconds",
        "apply_errors",
        "queries_compared",
        "queries_matching",
        "error_rate",
        "tables_verified",
        "tables_differing",
        "rows_differing",
        "last_verified",
    ]
    reports = proxy.verifier().last_reports()
    validator = getattr(proxy, "validator", None)
    metrics = validator.metrics() if validator is not None else None
    store = proxy.state_store()
    rows: list[Sequence[Any]] = []
    for name in sorted(proxy.databases):
        machine = proxy.upgrades.get(name)
        status = machine.status() if machine is not None else None
        record = store.phase(name) if store is not None else None
        blocked = describe(shut(status.gates)) if status else None
        replay = proxy.replay.report(name) if proxy.replay is not None else None
        lag = replay.lag if replay is not None and replay.lag.position_known else None  # unknown before it connects
        mine = [r for (db, _), r in reports.items() if db == name]
        database = proxy.databases[name]
        rows.append(
            [
                name,
                record.phase if record else None,
                _ts(record.since) if record else None,
                record.reason if record else None,
                status.activity if status else None,
                blocked or None,
                status.last_error if status else None,
                database.route.role,
                round(status.last_switch.pause_seconds, 4) if status and status.last_switch else None,
                sum(1 for s in proxy.sessions.values() if s.database is database and s.server_role == READ_SHIFT_ROLE),
                database.capture is not None,
                bool(replay and replay.running),
                replay.status.applied_position if replay else None,
                lag.transactions if lag else None,
                round(lag.seconds, 3) if lag else None,
                replay.apply_errors if replay else None,
                getattr(metrics, "total", None),
                getattr(metrics, "matching", None),
                getattr(metrics, "error_rate_window", None),
                len(mine),
                sum(1 for r in mine if not r.clean),
                sum(len(r.remaining) if r.repairs else len(r.verification.differences) for r in mine),
                _ts(max(r.finished_at for r in mine)) if mine else None,
            ]
        )
    return Result(f"SHOW {len(rows)}", columns, rows)


@command("SHOW UPGRADE HISTORY")
async def show_upgrade_history(proxy: Proxy, _session: Session) -> Result:
    """Every phase transition of every database, with its reason."""
    store = proxy.state_store()
    rows: list[Sequence[Any]] = []
    if store is not None:
        for name in sorted(proxy.databases):
            rows += [[t.database, t.from_phase, t.to_phase, _ts(t.at), t.reason] for t in store.transitions(name)]
    return Result(f"SHOW {len(rows)}", ["database", "from_phase", "to_phase", "at", "reason"], rows)
