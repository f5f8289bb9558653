"""Waiting until a moment, as exactly as asked.

asyncio's timers wake up to a millisecond late (epoll rounds its timeout up
to the millisecond), which is a millisecond of error in every TTFT against
a fast target. With ``spin`` seconds given, the wait sleeps until ``spin``
before the moment and yields to the loop until it arrives: other tasks keep
running, at the price of up to ``spin`` seconds of CPU per wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["sleep_until"]


async def sleep_until(
    deadline: float, *, clock: Callable[[], float] = time.perf_counter, spin: float = 0.0
) -> None:
    """Return at ``deadline`` (a ``clock()`` reading), or at once if it has passed."""
    delay = deadline - clock()
    if delay > spin:
        await asyncio.sleep(delay - spin)
    if spin:
        while clock() < deadline:
            await asyncio.sleep(0)
