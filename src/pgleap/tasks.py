"""Stopping background tasks for certain."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_until_done(task: asyncio.Task[Any], every: float) -> None:
    """Cancel `task`, again every `every` seconds until it has ended (its own exception, if any, is raised).

    A cancellation can be lost (a wait_for racing its inner future on Python 3.11, a suppress that swallows
    it): once, in CI, the drive went on verifying while INITIATE CUTOVER waited for it to stop, for good.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    with contextlib.suppress(asyncio.CancelledError):
        await task
