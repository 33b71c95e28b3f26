"""Progress of a copy per table and in total: for the CLI display, SHOW UPGRADE TABLES and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pgleap.store import ChunkRecord, StateStore


@dataclass
class LiveCounters:
    """Bytes streamed by chunks still in flight (in memory; the store has finished chunks)."""

    inflight_bytes: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)

    def add(self, chunk_id: str, nbytes: int) -> None:
        """Count bytes streamed for a chunk."""
        self.inflight_bytes[chunk_id] = self.inflight_bytes.get(chunk_id, 0) + nbytes

    def finish(self, chunk_id: str) -> None:
        """Forget a chunk once it is committed (or rolled back)."""
        self.inflight_bytes.pop(chunk_id, None)


@dataclass(frozen=True)
class TableProgress:
    """One row of SHOW UPGRADE TABLES."""

    table: str
    status: str  # pending, copying, done
    chunks_done: int
    chunks_total: int
    rows: int
    bytes: int
    est_rows: float
    est_bytes: float
    rate_bytes_per_s: float
    eta_seconds: float | None
    flags: str

    @property
    def fraction(self) -> float:
        """Done fraction by estimated size."""
        return 1.0 if self.status == "done" else min(0.99, self.bytes / self.est_bytes) if self.est_bytes else 0.0


def _status(chunks: list[ChunkRecord]) -> str:
    if all(c.status == "done" for c in chunks):
        return "done"
    if any(c.status != "pending" for c in chunks):
        return "copying"
    return "pending"


def table_progress(store: StateStore, database: str, live: LiveCounters | None = None) -> list[TableProgress]:
    """Per-table progress from the store, plus live in-flight bytes when the copy runs in this process."""
    by_table: dict[str, list[ChunkRecord]] = {}
    for chunk in store.chunks(database):
        by_table.setdefault(f"{chunk.schema_name}.{chunk.table_name}", []).append(chunk)
    result = []
    for name, chunks in by_table.items():
        inflight = sum((live.inflight_bytes.get(c.chunk_id, 0) for c in chunks if c.status != "done"), 0) if live else 0
        done = [c for c in chunks if c.status == "done"]
        nbytes = sum(c.bytes for c in done) + inflight
        seconds = sum(c.seconds for c in done)
        rate = sum(c.bytes for c in done) / seconds if seconds > 0 else 0.0
        est_bytes = sum(c.est_bytes for c in chunks)
        remaining = max(0.0, est_bytes - sum(c.est_bytes for c in done))
        result.append(
            TableProgress(
                table=name,
                status=_status(chunks),
                chunks_done=len(done),
                chunks_total=len(chunks),
                rows=sum(c.rows for c in done),
                bytes=nbytes,
                est_rows=sum(c.est_rows for c in chunks),
                est_bytes=est_bytes,
                rate_bytes_per_s=rate,
                eta_seconds=0.0 if not remaining else (remaining / rate if rate else None),
                flags=chunks[0].flags,
            )
        )
    return result


@dataclass(frozen=True)
class TotalProgress:
    """The whole copy: what the progress bar and the gauges show."""

    tables_total: int
    tables_done: int
    rows: int
    bytes: int
    est_bytes: float
    elapsed_seconds: float
    rate_bytes_per_s: float
    rows_per_s: float
    eta_seconds: float | None


def total_progress(store: StateStore, database: str, live: LiveCounters | None = None) -> TotalProgress:
    """Totals over every table; rates over the wall time of this run (or of the stored chunks)."""
    tables = table_progress(store, database, live)
    run = store.run(database)
    if live is not None:
        elapsed = time.monotonic() - live.started_at
    elif run is not None:
        elapsed = (run.finished_at or time.time()) - run.started_at
    else:
        elapsed = 0.0
    nbytes = sum(t.bytes for t in tables)
    rows = sum(t.rows for t in tables)
    est = sum(t.est_bytes for t in tables)
    done_est = sum(t.est_bytes for t in tables if t.status == "done")
    rate = nbytes / elapsed if elapsed > 0 else 0.0
    eta: float | None
    if est and done_est >= est:
        eta = 0.0
    elif done_est > 0 and elapsed > 0:
        eta = elapsed * (est - done_est) / done_est
    else:
        eta = None
    return TotalProgress(
        tables_total=len(tables),
        tables_done=sum(t.status == "done" for t in tables),
        rows=rows,
        bytes=nbytes,
        est_bytes=est,
        elapsed_seconds=elapsed,
        rate_bytes_per_s=rate,
        rows_per_s=rows / elapsed if elapsed > 0 else 0.0,
        eta_seconds=eta,
    )


SHOW_UPGRADE_TABLES_COLUMNS = ("table", "status", "chunks", "rows", "bytes", "rate_mb_s", "eta_s", "flags")


def show_upgrade_tables(store: StateStore, database: str) -> list[tuple[str, ...]]:
    """Rows (all text) for the admin console's SHOW UPGRADE TABLES; columns in SHOW_UPGRADE_TABLES_COLUMNS."""
    return [
        (
            t.table,
            t.status,
            f"{t.chunks_done}/{t.chunks_total}",
            str(t.rows),
            str(t.bytes),
            f"{t.rate_bytes_per_s / 1e6:.1f}",
            "" if t.eta_seconds is None else f"{t.eta_seconds:.0f}",
            t.flags,
        )
        for t in table_progress(store, database)
    ]


def copy_gauges(store: StateStore, database: str) -> dict[str, float]:
    """Prometheus gauge values (label database=<database>) for the metrics exporter."""
    total = total_progress(store, database)
    run = store.run(database)
    return {
        "pgleap_copy_tables_total": float(total.tables_total),
        "pgleap_copy_tables_done": float(total.tables_done),
        "pgleap_copy_rows": float(total.rows),
        "pgleap_copy_bytes": float(total.bytes),
        "pgleap_copy_estimated_bytes": float(total.est_bytes),
        "pgleap_copy_rate_bytes_per_second": total.rate_bytes_per_s,
        "pgleap_copy_eta_seconds": -1.0 if total.eta_seconds is None else total.eta_seconds,
        "pgleap_copy_running": 1.0 if run is not None and run.status == "running" else 0.0,
        "pgleap_copy_schema_errors": float(len(store.schema_errors(database))),
    }
