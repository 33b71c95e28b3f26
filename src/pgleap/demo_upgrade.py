"""The demo's upgrade, driven through the admin console as a DBA would: START UPGRADE, the phases as pgleap
reports them, INITIATE CUTOVER once every gate holds, the reverse log carried back to Alice, the equality check.

Nothing here moves the upgrade along by itself: the state machine inside pgleap does (capture, the copy from
Bob at S, catch-up, mirroring with verification and read comparison, the gates). The demo only reads its
status, says what it sees, and fails loudly when pgleap reports an error or a step overruns its bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel

from pgleap.config import ServerConfig
from pgleap.demo_view import (
    Display,
    columns,
    console_query,
    first_row,
    record_table,
    replay_metrics,
    result_table,
)
from pgleap.upgrade.copy.compare import database_differences

if TYPE_CHECKING:
    import psycopg

UPGRADE_TIMEOUT = 300.0  # seconds from START UPGRADE to cutover_ready (copy, catch-up, verification, validation)
REGATE_TIMEOUT = 60.0  # seconds a refused cutover may wait for the gates to hold again
CUTOVER_ATTEMPTS = 5  # a gate may shut for a moment (lag under load) between cutover_ready and the command
REVERSE_TIMEOUT = 120.0  # seconds the reverse log may take to reach Alice once the workload stops
POLL_SECONDS = 1.0
PROGRESS_SECONDS = 3.0  # a one-line progress note at most this often (the panel alone scrolls away in logs)
STATUS_COLUMNS = (
    "phase",
    "phase_reason",
    "activity",
    "blocked_by",
    "last_error",
    "routed_to",
    "last_pause_s",
    "lag_transactions",
    "lag_seconds",
    "queries_compared",
    "queries_matching",
    "error_rate",
    "tables_verified",
    "tables_differing",
    "rows_differing",
)
TABLES_COLUMNS = ("table", "status", "chunks", "rows", "bytes", "rate_mb_s", "eta_s")
REPLAY_COLUMNS = (
    "database",
    "running",
    "applied_position",
    "last_position",
    "lag_transactions",
    "lag_seconds",
    "applied",
    "skipped_in_snapshot",
    "divergences",
    "apply_errors",
)
# Phases in which the copy's tables are worth showing (before it, SHOW UPGRADE TABLES is empty).
_COPY_SHOWN = {"copying", "catching_up", "mirroring", "cutover_ready"}


class UpgradeFailed(Exception):
    """pgleap reported an error, refused a step, or a step overran its bound."""


class UpgradeStory:
    """One database's upgrade, watched and steered through the console connection `admin`."""

    def __init__(
        self,
        admin: psycopg.Connection[Any],
        console: Console,
        database: str,
        check: Callable[[], None],
        extras: Callable[[], Sequence[RenderableType]],
    ) -> None:
        self.admin = admin
        self.console = console
        self.database = database
        self._check = check  # raises when something outside pgleap failed (the workload)
        self._extras = extras  # the panels shown under the upgrade's own (metrics, the replica's lag)
        self._history_seen = 0
        self._started = time.monotonic()
        self._progress_at = 0.0

    # -- the forward direction ----------------------------------------------------------------

    def start(self) -> None:
        """START UPGRADE: from here on pgleap drives the phases itself."""
        self._started = time.monotonic()
        for (note,) in console_query(self.admin, "START UPGRADE").rows:
            self.console.print(f"START UPGRADE: {note}")

    def until(self, phase: str, display: Display, timeout: float = UPGRADE_TIMEOUT) -> dict[str, Any]:
        """Show the upgrade until it is in `phase`; its status row then."""
        deadline = time.monotonic() + timeout
        shown: str | None = None
        while True:
            status = self.status()
            self._print_moves()
            if status.get("last_error"):
                raise UpgradeFailed(f"pgleap reports an error in phase {status['phase']}: {status['last_error']}")
            self._check()
            display.show(self.panel(status), force=status["phase"] != shown)
            shown = status["phase"]
            if time.monotonic() - self._progress_at >= PROGRESS_SECONDS:
                self._progress_at = time.monotonic()
                self._print_progress(status)
            if shown == phase:
                return status
            if time.monotonic() > deadline:
                raise UpgradeFailed(f"the upgrade is not {phase} after {timeout:.0f}s: {describe_status(status)}")
            time.sleep(POLL_SECONDS)

    def cutover(self, display: Display) -> float:
        """INITIATE CUTOVER (again, if a gate shut in between); the measured pause, in seconds."""
        import psycopg

        for attempt in range(1, CUTOVER_ATTEMPTS + 1):
            try:
                notes = console_query(self.admin, "INITIATE CUTOVER").rows
                break
            except psycopg.Error as exc:
                if attempt == CUTOVER_ATTEMPTS:
                    raise UpgradeFailed(f"INITIATE CUTOVER refused {attempt} times, last: {exc}") from exc
                self.console.print(f"INITIATE CUTOVER refused ({str(exc).strip()}); waiting for the gates again")
                self.until("cutover_ready", display, REGATE_TIMEOUT)
        for (note,) in notes:
            self.console.print(f"INITIATE CUTOVER: {note}")
        status = self.status()
        self._print_moves()
        if status["phase"] != "cut_over" or status["routed_to"] != "target":
            raise UpgradeFailed(f"after INITIATE CUTOVER: {describe_status(status)}")
        return float(status["last_pause_s"])

    # -- after the cutover ----------------------------------------------------------------------

    def watch(self, seconds: float, display: Display) -> None:
        """Show the upgrade for `seconds` (the workload goes on, on the target)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = self.status()
            if status.get("last_error"):
                raise UpgradeFailed(f"pgleap reports an error in phase {status['phase']}: {status['last_error']}")
            self._check()
            display.show(self.panel(status))
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        display.show(self.panel(self.status()), force=True)

    def reverse_caught_up(
        self, metrics_port: int, history_rows: Callable[[], tuple[int, int]], timeout: float = REVERSE_TIMEOUT
    ) -> dict[str, float]:
        """Wait until every write made on the target is logged and applied to the source; the reverse replay's
        series from /metrics then.

        SHOW REPLAY lists the configured databases only, not the reverse log `<db>@reverse`, so the reverse
        replay is read from /metrics, which has every replay run. That is a sample up to a second old, so
        "caught up" is decided on the data as well: `history_rows()` gives pgbench_history's rows on the
        target and on the source, and replay applies whole transactions in commit order, each TPC-B one
        adding a row, so equal counts once the workload has stopped mean every write has reached the source.
        """
        name = f"{self.database}@reverse"
        deadline = time.monotonic() + timeout
        while True:
            # Nothing pending either: the workload's last COMMITs may still be settling into the log.
            settled = first_row(self.admin, "SHOW CAPTURE").get("log_pending") == "0"
            replay = replay_metrics(metrics_port, name)
            if not replay.get("running"):
                raise UpgradeFailed(f"the reverse log {name!r} is not being replayed into the source: {replay}")
            if replay.get("apply_errors_total"):
                raise UpgradeFailed(f"the source refused transactions of the reverse log {name!r}: {replay}")
            target_rows, source_rows = history_rows()
            if settled and target_rows == source_rows and replay.get("lag_transactions") == 0:
                return replay
            if time.monotonic() > deadline:
                raise UpgradeFailed(
                    f"the reverse log did not reach the source within {timeout:.0f}s: pgbench_history has "
                    f"{target_rows} rows on the target, {source_rows} on the source; {name}: {replay}"
                )
            time.sleep(0.5)

    def complete(self) -> None:
        """COMPLETE UPGRADE: the fallback period ends, pgleap stops writing the source."""
        for (note,) in console_query(self.admin, "COMPLETE UPGRADE").rows:
            self.console.print(f"COMPLETE UPGRADE: {note}")
        self._print_moves()

    # -- reading and showing ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """SHOW UPGRADE STATUS's row for the database."""
        for row in console_query(self.admin, "SHOW UPGRADE STATUS").dicts():
            if row["database"] == self.database:
                return row
        raise UpgradeFailed(f"SHOW UPGRADE STATUS has no row for {self.database}")

    def history(self) -> list[dict[str, Any]]:
        """SHOW UPGRADE HISTORY: every phase move so far, with its reason."""
        return console_query(self.admin, "SHOW UPGRADE HISTORY").dicts()

    def _print_moves(self) -> None:
        """Print the phase moves not printed yet (history has them all, even a phase too short to be polled)."""
        moves = self.history()
        for move in moves[self._history_seen :]:
            elapsed = time.monotonic() - self._started
            self.console.print(
                f"[bold]phase[/] {move['from_phase'] or '-'} -> [bold]{move['to_phase']}[/] "
                f"(t={elapsed:.0f}s): {move['reason']}"
            )
        self._history_seen = len(moves)

    def _print_progress(self, status: dict[str, Any]) -> None:
        """One line on what the phase is doing: the copy's tables, or the validation and what still blocks."""
        phase, elapsed = status["phase"], time.monotonic() - self._started
        if phase == "copying":
            tables = console_query(self.admin, "SHOW UPGRADE TABLES").dicts()
            done = sum(1 for t in tables if t["status"] == "done")
            rows = sum(int(t["rows"] or 0) for t in tables)
            note = f"{done} of {len(tables)} tables copied, {rows:,} rows so far (SHOW UPGRADE TABLES)"
        elif phase in ("catching_up", "mirroring"):
            blocked = status["blocked_by"] or f"(gates not judged yet: {status['activity']})"
            note = (
                f"lag {status['lag_transactions']} transactions / {status['lag_seconds']}s; "
                f"{status['tables_verified']} tables verified, {status['tables_differing']} differing; "
                f"{status['queries_compared']} reads compared, {status['queries_matching']} matching; "
                f"blocked_by: {blocked}"
            )
        else:
            return
        self.console.print(f"  {phase} (t={elapsed:.0f}s): {note}")

    def panel(self, status: dict[str, Any]) -> RenderableType:
        """The upgrade's status, copy progress and replay, over the caller's extra panels."""
        parts: list[RenderableType] = [record_table("SHOW UPGRADE STATUS", status, STATUS_COLUMNS)]
        if status["phase"] in _COPY_SHOWN:
            parts.append(result_table(columns(console_query(self.admin, "SHOW UPGRADE TABLES"), TABLES_COLUMNS)))
        parts.append(result_table(columns(console_query(self.admin, "SHOW REPLAY"), REPLAY_COLUMNS)))
        parts.extend(self._extras())
        elapsed = time.monotonic() - self._started
        return Panel(
            Group(*parts),
            title=f"pgleap admin console (dbname=pgleap): {status['phase']} at t={elapsed:.0f}s",
            title_align="left",
        )


def describe_status(status: dict[str, Any]) -> str:
    """The status fields that say where an upgrade stands, for error messages."""
    return ", ".join(f"{name}={status.get(name)!r}" for name in ("phase", "activity", "blocked_by", "last_error"))


def differences(one: ServerConfig, other: ServerConfig) -> list[str]:
    """Every table of `one` against `other`, row by row: one line per table that differs."""
    return asyncio.run(database_differences(one, other))
