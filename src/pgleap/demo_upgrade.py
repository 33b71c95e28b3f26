"""The demo's upgrade part: capture, the copy from Bob to Charles under load, replay, and the equality check.

While pgbench writes through pgleap, capture logs every committed write; the copy reads Bob (the
replica) at one snapshot S; replay then applies on Charles everything committed after S. Once
pgbench is done and the lag is 0, every table of Charles is compared with Alice's, row by row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from pgleap.config import ServerConfig, UpgradeConfig
from pgleap.lab import LabServer
from pgleap.store import StateStore
from pgleap.upgrade.copy import CopyJob, CopyOptions, CopyReport
from pgleap.upgrade.copy.compare import database_differences

if TYPE_CHECKING:
    import psycopg

CATCH_UP_TIMEOUT = 180.0  # seconds replay may take to apply the workload's backlog after pgbench ends


def server(lab_server: LabServer, database: str) -> ServerConfig:
    """A lab server's superuser on `database`."""
    return ServerConfig(lab_server.host, lab_server.port, database, lab_server.superuser, lab_server.password)


class Mirroring:
    """Capture on Alice, copy from Bob at S, replay on Charles; then prove Charles equals Alice."""

    def __init__(self, upgrade: UpgradeConfig, state_path: Path, admin_dsn: str) -> None:
        self.upgrade = upgrade
        self.state_path = state_path
        self.admin_dsn = admin_dsn
        self.report: CopyReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy_then_replay, name="demo-copy", daemon=True)

    def start(self, admin: psycopg.Connection[Any], console: Console) -> None:
        """START CAPTURE now; the copy and START REPLAY follow in the background, under the workload."""
        for (note,) in admin.execute("START CAPTURE").fetchall():
            console.print(f"  START CAPTURE: {note}")
        console.print("copying Bob (Alice's replica) to Charles at one snapshot S while pgbench writes ...")
        self._thread.start()

    def _copy_then_replay(self) -> None:
        import psycopg

        try:
            store = StateStore(self.state_path)
            try:
                options = CopyOptions(parallel_workers=2)
                self.report = asyncio.run(CopyJob(self.upgrade, store, options).run())
            finally:
                store.close()
            # Its own console connection: psycopg connections are not shared between threads.
            with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
                admin.execute("START REPLAY")
        except BaseException as exc:  # reported by finish(), in the main thread
            self.error = exc

    def finish(self, admin: psycopg.Connection[Any], console: Console) -> None:
        """Wait for the copy and for replay to catch up, then compare every table of Charles with Alice's."""
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the copy or START REPLAY failed: {self.error}") from self.error
        assert self.report is not None
        report = self.report
        console.print(
            f"copy done: {report.rows:,} rows, {report.bytes / 1e6:,.1f} MB in {report.seconds:.1f}s at S = "
            f"{report.snapshot}; replay applies on Charles what was committed after S"
        )
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while True:
            row = _first_row(admin, "SHOW REPLAY")
            # Nothing pending either: the last COMMITs of the workload may still be settling into the log.
            settled = _first_row(admin, "SHOW CAPTURE").get("log_pending") == "0"
            if (
                settled
                and row.get("lag_transactions") == "0"
                and row.get("applied_position") == row.get("last_position")
            ):
                break
            if row.get("paused_error") or row.get("stopped_error"):
                raise RuntimeError(f"replay stopped: {row.get('paused_error') or row.get('stopped_error')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replay did not catch up within {CATCH_UP_TIMEOUT:.0f}s: {row}")
            time.sleep(0.2)
        problems = asyncio.run(database_differences(self.upgrade.source, self.upgrade.target))  # type: ignore[arg-type]
        if problems:
            raise RuntimeError("Charles differs from Alice:\n" + "\n".join(problems))
        console.print(
            f"[green]Charles (PostgreSQL 18) equals Alice (PostgreSQL 10), every table row by row[/]: "
            f"{row['applied']} transactions replayed after S, {row['divergences']} divergences, "
            f"{row['apply_errors']} apply errors"
        )


def _first_row(admin: psycopg.Connection[Any], command: str) -> dict[str, Any]:
    """An admin command's first row, by column name."""
    cursor = admin.execute(command)
    names = [c.name for c in cursor.description or ()]
    return dict(zip(names, cursor.fetchone() or (), strict=True))
