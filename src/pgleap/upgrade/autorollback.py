"""Automatic rollback after cutover: the clients' error rate over a sliding window of the database's counters.

The proxy counts, per client-facing database, the requests answered (ReadyForQuery) and the ErrorResponses
the server sent (proxy/stats.py). While an upgrade is cut over, the state machine samples both; when the
errors over the last `rollback_window` seconds are more than `rollback_error_rate` of the queries, with
at least `rollback_min_queries` of them, it rolls back as ROLLBACK UPGRADE does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pgleap.config import CutoverConfig

SAMPLE_INTERVAL = 0.5  # seconds between two samples of the counters


@dataclass(frozen=True)
class Sample:
    """The database's cumulative counters at one moment (monotonic seconds)."""

    at: float
    queries: int
    errors: int


@dataclass(frozen=True)
class WindowRate:
    """Queries and errors between the oldest sample of the window and the newest."""

    seconds: float
    queries: int
    errors: int

    @property
    def rate(self) -> float:
        """Errors per query (0 when nothing was asked)."""
        return self.errors / self.queries if self.queries else 0.0


@dataclass(frozen=True)
class RollbackPolicy:
    """When the error rate after cutover rolls back by itself ([auto_upgrade.cutover])."""

    threshold: float  # errors per query above which it rolls back; 0: never
    window: float  # seconds
    min_queries: int

    @classmethod
    def from_config(cls, config: CutoverConfig) -> RollbackPolicy:
        """The policy of a database's cutover config."""
        return cls(config.rollback_error_rate, config.rollback_window, config.rollback_min_queries)

    @property
    def enabled(self) -> bool:
        """Whether automatic rollback is on."""
        return self.threshold > 0

    def triggered(self, rate: WindowRate) -> bool:
        """Whether `rate` calls for a rollback."""
        return self.enabled and rate.queries >= max(1, self.min_queries) and rate.rate > self.threshold

    def reason(self, rate: WindowRate) -> str:
        """The transition's reason, as SHOW UPGRADE HISTORY shows it."""
        return (
            f"automatic rollback: error rate {rate.rate:.2%} over {rate.seconds:.1f}s after cutover > threshold "
            f"{self.threshold:.2%} ({rate.errors} errors in {rate.queries} queries)"
        )

    def describe(self, rate: WindowRate) -> str:
        """What the watch sees now, for the status's activity."""
        if not self.enabled:
            return "automatic rollback off"
        return (
            f"error rate {rate.rate:.2%} over {rate.seconds:.1f}s ({rate.errors} of {rate.queries} queries); "
            f"automatic rollback above {self.threshold:.2%} with at least {self.min_queries} queries "
            f"in {self.window:g}s"
        )


class ErrorWindow:
    """Samples of the cumulative counters, kept for `window` seconds; the rate over what is kept.

    Until a full window has passed since the first sample (the cutover), the rate covers what there is.
    """

    def __init__(self) -> None:
        self._samples: deque[Sample] = deque()

    def add(self, sample: Sample, window: float) -> WindowRate:
        """Record `sample` and return the rate over the last `window` seconds up to it."""
        if self._samples:
            last = self._samples[-1]
            if sample.queries < last.queries or sample.errors < last.errors:
                self._samples.clear()  # the counters were replaced (a reload): start over from this sample
        self._samples.append(sample)
        while self._samples[0].at < sample.at - window:
            self._samples.popleft()
        base = self._samples[0]
        return WindowRate(sample.at - base.at, sample.queries - base.queries, sample.errors - base.errors)
