"""What the demo shows and how: admin console answers as psql-like tables, the Prometheus series, the replica's
lag, and a display that is live on a terminal and a throttled series of prints in logs."""

from __future__ import annotations

import math
import os
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    import psycopg

HOST = "127.0.0.1"
LOG_WIDTH = 160
LOG_EVERY_SECONDS = 15.0  # without a terminal, a routine refresh is printed at most this often
_PG10 = 100000


@dataclass
class ResultTable:
    """Columns and rows of one query, as psql would show them."""

    title: str
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def dicts(self) -> list[dict[str, Any]]:
        """The rows by column name."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


@dataclass
class MetricsSample:
    """The few Prometheus series the demo shows, summed over databases."""

    transactions: float
    queries: float
    bytes_in: float
    bytes_out: float
    p50_ms: float | None
    p99_ms: float | None
    at: float  # time.monotonic() of the scrape, for rates between two samples


def make_console() -> Console:
    """A console that is live on a terminal and plain (no colours, no cursor moves) in logs and CI."""
    console = Console(force_terminal=None, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Rich assumes 80 columns without a terminal, which folds every console table into slivers.
        console = Console(force_terminal=None, highlight=False, width=LOG_WIDTH)
    return console


# ---------------------------------------------------------------------------- reading


def console_query(conn: psycopg.Connection[Any], command: str) -> ResultTable:
    """Run one admin console command (a simple query, as psql sends it) and return its table."""
    cursor = conn.execute(command)  # no parameters: psycopg sends a simple Query, all the console accepts
    columns = [c.name for c in cursor.description or ()]
    return ResultTable(command, columns, [tuple(row) for row in cursor.fetchall()])


def first_row(conn: psycopg.Connection[Any], command: str) -> dict[str, Any]:
    """An admin command's first row, by column name (values as the console sends them: text)."""
    rows = console_query(conn, command).dicts()
    if not rows:
        raise RuntimeError(f"{command} answered no row")
    return rows[0]


def columns(result: ResultTable, names: Sequence[str]) -> ResultTable:
    """Only the named columns of a result (a console row can be wider than a terminal)."""
    keep = [result.columns.index(n) for n in names]
    return ResultTable(result.title, list(names), [tuple(row[i] for i in keep) for row in result.rows])


def replication_sql(server_version_num: int) -> str:
    """Replay lag per standby from the primary's pg_stat_replication, in the server's own vocabulary."""
    if server_version_num >= _PG10:
        return (
            "SELECT application_name AS standby, state, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_lag_bytes, "
            "replay_lag::text AS replay_lag_time FROM pg_stat_replication"
        )
    # 9.x: *_location columns and xlog functions; no lag-time columns before 10.
    return (
        "SELECT application_name AS standby, state, "
        "pg_xlog_location_diff(pg_current_xlog_location(), replay_location)::bigint AS replay_lag_bytes, "
        "NULL::text AS replay_lag_time FROM pg_stat_replication"
    )


def replication(primary: psycopg.Connection[Any], title: str) -> ResultTable:
    """The primary's view of its standbys' replay lag."""
    cursor = primary.execute(replication_sql(primary.info.server_version))
    names = [c.name for c in cursor.description or ()]
    return ResultTable(title, names, [tuple(row) for row in cursor.fetchall()])


def scrape_metrics(port: int) -> MetricsSample:
    """Read /metrics and sum the demo's series over databases."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pgleap_query_duration_seconds_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            else:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    cumulative = sorted(buckets.items())
    return MetricsSample(
        transactions=sums.get("pgleap_transactions_total", 0.0),
        queries=sums.get("pgleap_queries_total", 0.0),
        bytes_in=sums.get("pgleap_received_bytes_total", 0.0),
        bytes_out=sums.get("pgleap_sent_bytes_total", 0.0),
        p50_ms=quantile_ms(cumulative, 0.50),
        p99_ms=quantile_ms(cumulative, 0.99),
        at=time.monotonic(),
    )


def replay_metrics(port: int, database: str) -> dict[str, float]:
    """The pgleap_replay_* series of one replay run (e.g. "app@reverse"), without the prefix; empty if none."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("pgleap_replay_") and sample.labels.get("database") == database:
                found[sample.name.removeprefix("pgleap_replay_")] = sample.value
    return found


def quantile_ms(cumulative: Sequence[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative Prometheus buckets, interpolated linearly inside a bucket (as histogram_quantile)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound * 1000  # beyond the last finite bucket: its bound is all we know
            width = count - lower_count
            fraction = (rank - lower_count) / width if width else 1.0
            return (lower_bound + (bound - lower_bound) * fraction) * 1000
        lower_bound, lower_count = bound, count
    return None


# ---------------------------------------------------------------------------- rendering


class Display:
    """Shows successive panels: one Live region on a terminal; in logs, a print per `show(..., force=True)`
    and otherwise at most one every LOG_EVERY_SECONDS (a refresh a second would bury the story)."""

    def __init__(self, console: Console, live: Live | None) -> None:
        self.console = console
        self._live = live
        self._printed_at = -math.inf

    def show(self, renderable: RenderableType, *, force: bool = False) -> None:
        """Show `renderable` in place of the previous panel."""
        if self._live is not None:
            self._live.update(renderable, refresh=True)
        elif force or time.monotonic() - self._printed_at >= LOG_EVERY_SECONDS:
            self.console.print(renderable)
            self._printed_at = time.monotonic()


@contextmanager
def display(console: Console) -> Iterator[Display]:
    """A Display for the duration of the block (console.print still works above a Live region)."""
    if not console.is_terminal:
        yield Display(console, None)
        return
    with Live(console=console, auto_refresh=False, transient=False) as live:
        yield Display(console, live)


def result_table(result: ResultTable, caption: str | None = None) -> Table:
    """A rich table with psql's layout: column names as headers, one line per row."""
    table = Table(title=result.title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left")
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    if not result.rows:
        table.caption = "(0 rows)"
    return table


def record_table(title: str, record: dict[str, Any], names: Sequence[str]) -> Table:
    """One row shown vertically (psql's \\x): a status row is too wide for a line."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_header=False)
    table.add_column("column", style="bold")
    table.add_column("value", overflow="fold")
    for name in names:
        value = record.get(name)
        table.add_row(name, "" if value is None else str(value))
    return table


def metrics_table(metrics: MetricsSample, previous: MetricsSample | None) -> Table:
    """The Prometheus series in one row, with the transaction rate since the previous scrape."""
    table = Table(title="Prometheus /metrics (summed over databases)", box=box.SIMPLE_HEAD, title_justify="left")
    rate = None
    if previous is not None and metrics.at > previous.at:
        rate = (metrics.transactions - previous.transactions) / (metrics.at - previous.at)
    cells = {
        "pgleap_transactions_total": f"{metrics.transactions:,.0f}",
        "rate (last interval)": "-" if rate is None else f"{rate:,.0f}/s",
        "pgleap_queries_total": f"{metrics.queries:,.0f}",
        "received": human_bytes(metrics.bytes_in),
        "sent": human_bytes(metrics.bytes_out),
        "latency p50": ms(metrics.p50_ms),
        "latency p99": ms(metrics.p99_ms),
    }
    for name in cells:
        table.add_column(name, justify="right")
    table.add_row(*cells.values())
    return table


def ms(value: float | None) -> str:
    """Milliseconds, or '-' when unknown."""
    return "-" if value is None else f"{value:.2f} ms"


def human_bytes(value: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    if value < 1024:
        return f"{value:,.0f} B"
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:,.1f} {unit}"
    return f"{value / 1024:,.1f} GiB"
