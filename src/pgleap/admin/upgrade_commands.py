"""Admin commands of the upgrade engine: replay (START/STOP/RESUME/SHOW REPLAY, queued DDL) and SHOW UPGRADE RISKS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pgleap.admin.commands import AdminCommandError, Result, _ts, command, notes_result
from pgleap.errors import PgleapError
from pgleap.proxy.route import reverse_name
from pgleap.upgrade.replay.ddl_queue import Decision

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy
    from pgleap.proxy.session import Session
    from pgleap.upgrade.replay.errors import ApplyError
    from pgleap.upgrade.replay.service import ReplayReport, ReplayService

SHOW_REPLAY_COLUMNS = (
    "database",
    "running",
    "connected",
    "applied_position",
    "last_position",
    "lag_transactions",
    "lag_bytes",
    "lag_seconds",
    "apply_rate",
    "applied",
    "skipped_in_snapshot",
    "skipped_on_error",
    "divergences",
    "apply_errors",
    "paused_error",
    "held_ddl",
    "retries",
    "last_transient_error",
    "stopped_error",
)
_STATEMENT_CHARS = 200  # of a paused statement shown in one cell; the journal keeps it whole


@command("START REPLAY")
async def start_replay(proxy: Proxy, _session: Session) -> Result:
    """Apply every database's change log on its target, from the copy snapshot S."""
    try:
        notes = proxy.start_replay()
    except PgleapError as exc:
        raise AdminCommandError(f"START REPLAY failed: {exc}") from exc
    return notes_result("START REPLAY", notes)


@command("STOP REPLAY")
async def stop_replay(proxy: Proxy, _session: Session) -> Result:
    """Stop replay after the current batch; START REPLAY resumes at the target's applied position."""
    notes = await proxy.stop_replay()
    return notes_result("STOP REPLAY", notes)


@command("RESUME REPLAY")
async def resume_replay(proxy: Proxy, _session: Session) -> Result:
    """Retry the transaction a paused replay stopped at (after fixing the target)."""
    return _replay_notes("RESUME REPLAY", proxy, lambda service: service.resume(skip=False))


@command("RESUME REPLAY SKIP")
async def resume_replay_skip(proxy: Proxy, _session: Session) -> Result:
    """Skip the transaction a paused replay stopped at; its tables are flagged for re-sync."""
    return _replay_notes("RESUME REPLAY", proxy, lambda service: service.resume(skip=True))


@command("APPLY QUEUED DDL")
async def apply_queued_ddl(proxy: Proxy, _session: Session) -> Result:
    """Replay the schema change replay holds at (ddl = "queue") as the source ran it."""
    return _replay_notes("APPLY QUEUED DDL", proxy, lambda service: service.decide_ddl(Decision.APPLY))


@command("SKIP QUEUED DDL")
async def skip_queued_ddl(proxy: Proxy, _session: Session) -> Result:
    """Go on past the held schema change without running it (it was applied on the target by hand)."""
    return _replay_notes("SKIP QUEUED DDL", proxy, lambda service: service.decide_ddl(Decision.SKIP_DDL))


def _replay_notes(tag: str, proxy: Proxy, act: Callable[[ReplayService], list[str]]) -> Result:
    if proxy.replay is None:
        raise AdminCommandError(f"{tag}: replay has not started (START REPLAY)")
    return notes_result(tag, act(proxy.replay))


@command("SHOW REPLAY")
async def show_replay(proxy: Proxy, _session: Session) -> Result:
    """Per database: whether replay runs, where it is, its lag and what it could not apply; after a cutover,
    a second row for its reverse log (`<database>@reverse`, replayed into the source)."""
    rows: list[Sequence[Any]] = []
    for name in sorted(proxy.databases):
        report = proxy.replay.report(name) if proxy.replay is not None else None
        if report is None:
            rows.append([name, False, False, *([None] * (len(SHOW_REPLAY_COLUMNS) - 3))])
        else:
            rows.append(_replay_row(report))
        reverse = proxy.replay.report(reverse_name(name)) if proxy.replay is not None else None
        if reverse is not None:
            rows.append(_replay_row(reverse))
    return Result(f"SHOW {len(rows)}", SHOW_REPLAY_COLUMNS, rows)


def _replay_row(report: ReplayReport) -> list[Any]:
    status, lag = report.status, report.lag
    # Until replay has reached the target once, where it stands there is not known: NULL, not the whole log.
    known = lag.position_known
    return [
        report.database,
        report.running,
        status.connected,
        status.applied_position if known else None,
        lag.last_position,
        lag.transactions if known else None,
        lag.bytes if known else None,
        round(lag.seconds, 3) if known else None,
        round(lag.apply_rate, 1),
        status.applied,
        status.skipped_in_snapshot,
        status.skipped_on_error,
        status.divergences,
        report.apply_errors,
        _paused_text(status.paused),
        status.held_ddl.describe() if status.held_ddl is not None else None,
        status.retries,
        status.last_transient_error,
        report.stopped_error,
    ]


def _paused_text(error: ApplyError | None) -> str | None:
    if error is None:
        return None
    statement = (
        error.statement if len(error.statement) <= _STATEMENT_CHARS else error.statement[:_STATEMENT_CHARS] + "…"
    )
    where = f"position {error.position} (txid {error.txid})"
    return f"{where}: {error.sqlstate} {error.message} [{error.kind.value}] in {statement!r}"


@command("SHOW UPGRADE RISKS")
async def show_upgrade_risks(proxy: Proxy, _session: Session) -> Result:
    """What may make the target differ from the source; today: sessions writing on the source outside pgleap."""
    columns = [
        "database",
        "risk",
        "client_addr",
        "client_port",
        "user",
        "application_name",
        "pid",
        "writing_now",
        "first_seen",
        "last_seen",
        "times_seen",
    ]
    rows: list[Sequence[Any]] = []
    for name, monitor in sorted(proxy.bypass_monitors.items()):
        for writer in sorted(monitor.writers.values(), key=lambda w: w.first_seen):
            rows.append(
                [
                    name,
                    "bypass_writer",
                    writer.client_addr,
                    writer.client_port,
                    writer.usename,
                    writer.application_name,
                    writer.pid,
                    monitor.active(writer),
                    _ts(writer.first_seen),
                    _ts(writer.last_seen),
                    writer.times_seen,
                ]
            )
    return Result(f"SHOW {len(rows)}", columns, rows)
