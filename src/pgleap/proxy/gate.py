"""PAUSE/RESUME: hold new transactions at their boundary while running ones finish."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class PauseGate:
    """While paused, sessions hold their next transaction until `resume`."""

    def __init__(self) -> None:
        self.paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._changed = asyncio.Event()

    def pause(self) -> None:
        """Stop letting new transactions start."""
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        """Release every held session."""
        self.paused = False
        self._resumed.set()

    async def wait_resumed(self) -> None:
        """Return once the gate is open."""
        await self._resumed.wait()

    def notify(self) -> None:
        """A session reached a transaction boundary (wakes `wait_drained`)."""
        self._changed.set()

    async def wait_drained(self, busy: Callable[[], int], timeout: float | None) -> int:
        """Wait until `busy()` sessions are mid-transaction is 0; return how many still are at timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (remaining := busy()) > 0:
            self._changed.clear()
            wait = None if deadline is None else deadline - loop.time()
            if wait is not None and wait <= 0:
                return remaining
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
            except TimeoutError:
                return busy()
        return 0
