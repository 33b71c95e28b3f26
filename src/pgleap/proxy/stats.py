"""Counters the hot path bumps; read by the admin console and the metrics exporter."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds; fine-grained at the low end where a healthy OLTP query lives.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass
class LatencyHistogram:
    """A cumulative-on-read histogram, cheap to observe (one bisect, one list increment)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        """Record one latency."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with +Inf, as Prometheus wants them."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):  # counts has the +Inf slot too
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    @property
    def count(self) -> int:
        """Number of observations."""
        return sum(self.counts)


@dataclass
class DatabaseStats:
    """Totals for one client-facing database."""

    queries: int = 0  # requests answered with ReadyForQuery (a simple Query, a Sync, a FunctionCall)
    transactions: int = 0
    errors: int = 0
    bytes_in: int = 0  # client -> pgleap
    bytes_out: int = 0  # pgleap -> client
    client_errors: int = 0  # connections pgleap refused or closed with an error
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
