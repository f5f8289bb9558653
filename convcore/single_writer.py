"""Writer tasks that take whatever queued while they were busy as their next batch.

Where a write costs about the same whatever it carries (a Redis round trip,
a SQL commit), callers that arrive together should share it. A lone call
goes out at once (no timer, no waiting for company); calls that queue
while a batch is under way are the next batch, at most ``max_batch`` of
them. The stores' automatic pipelining (Redis) and group commit (SQL) are
this queue with their own ``flush``.

One writer (the default) is a single writer: batches are flushed one after
another, as a SQLite commit must be. With ``writers=N`` up to N batches are
under way at once: calls that queue while every writer is busy still wait
for the first one free, and a new writer starts only when none is on its way
to the queue already, so batches stay as large as before. Where the other
end works while the caller waits (a Redis server running scripts), the next
batch is prepared and sent in that time instead of after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Pending", "SingleWriter"]

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")


def _future() -> asyncio.Future[R]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True)
class Pending(Generic[I, R]):
    """One submitted item and the future its caller awaits."""

    item: I
    future: asyncio.Future[R] = field(default_factory=_future)

    def settle(self, value: R | None = None, error: BaseException | None = None) -> None:
        """Answer the caller, once; later answers (and a caller gone) are ignored."""
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)  # type: ignore[arg-type]  # R may be optional


class SingleWriter(Generic[I, R]):
    """Submitted items, flushed in batches by at most ``writers`` tasks at
    once (one by default) per event loop.

    ``flush(batch)`` must settle each :class:`Pending` it is given; one it
    leaves unsettled, or every one when it raises, gets the error. With
    more than one writer, ``flush`` runs for several batches at once. With
    ``shielded`` a caller that stops waiting does not take its item out of
    the batch (the write is under way; a retry finds it); without, an item
    whose caller left before its batch was taken is the flush's to skip
    (its future is done).
    """

    def __init__(
        self,
        flush: Callable[[list[Pending[I, R]]], Awaitable[None]],
        *,
        max_batch: int,
        shielded: bool,
        writers: int = 1,
    ) -> None:
        self._flush = flush
        self._max_batch = max(1, max_batch)
        self._shielded = shielded
        self._max_writers = max(1, writers)
        self._queue: list[Pending[I, R]] = []
        self._writers: list[asyncio.Task[None]] = []
        self._coming: asyncio.Task[None] | None = None  # started, has not taken a batch yet

    async def submit(self, item: I) -> R:
        """``item``'s result, once the batch that carries it is flushed."""
        pending: Pending[I, R] = Pending(item)
        self._queue.append(pending)
        coming = self._coming
        if coming is None or coming.done():  # done: cancelled before it ever ran
            self._start()
        if self._shielded:
            return await asyncio.shield(pending.future)
        return await pending.future

    def _start(self) -> None:
        """A writer for the queue, unless every writer is busy (then the
        first one free takes it)."""
        live = self._writers
        if len(live) >= self._max_writers:
            live = self._writers = [t for t in live if not t.done()]
            if len(live) >= self._max_writers:
                return
        self._coming = asyncio.get_running_loop().create_task(self._drain())
        live.append(self._coming)

    async def aclose(self) -> None:
        """Wait for the writers to flush what they hold."""
        live = [t for t in self._writers if not t.done()]
        if live:
            await asyncio.shield(asyncio.wait(live))

    async def _drain(self) -> None:
        self._coming = None  # this writer, the one that was on its way: it takes the queue now
        while self._queue:
            taken = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            try:
                await self._flush(taken)
            except BaseException as exc:
                for pending in taken:
                    pending.settle(error=exc)
                if not isinstance(exc, Exception):
                    raise  # cancelled: nobody is told its item was written
                continue
            for pending in taken:
                pending.settle(error=RuntimeError("the batch's flush left this item unanswered"))
