"""Replay lag (transactions, bytes, seconds behind the log) and the apply rate."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

RATE_WINDOW = 10.0  # seconds over which the apply rate is averaged


@dataclass(frozen=True)
class ReplayLag:
    """How far the target is behind the change log, and how fast it is catching up."""

    database: str
    applied_position: int
    last_position: int
    transactions: int  # transactions in the log not yet applied (or skipped): committed, or their COMMIT in flight
    bytes: int  # their encoded size in the log
    seconds: float  # now - when the oldest of them was logged (0 when caught up)
    apply_rate: float  # log transactions consumed per second over the last RATE_WINDOW seconds
    # False until replay has read the target's applied position: the figures above then count from 0.
    position_known: bool = True


class RateMeter:
    """Counts events over a sliding window."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()

    def add(self, count: int, now: float | None = None) -> None:
        """`count` events happened now."""
        now = time.monotonic() if now is None else now
        self._events.append((now, count))
        self._trim(now)

    def rate(self, now: float | None = None) -> float:
        """Events per second over the window (0 with no events)."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self._events:
            return 0.0
        span = max(now - self._events[0][0], 1.0)  # at least a second, so one burst is not a huge rate
        return sum(n for _, n in self._events) / span

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()
