"""Group commit: appends waiting at the same time share one transaction.

A commit costs a round trip (and on SQLite the write lock and a WAL sync),
whatever it holds. Under load, most of an append's time is waiting for the
writer before it; a single writer that takes every waiting turn into one
transaction pays that cost once per batch instead of once per turn.

The rules, so a batch changes nothing a caller can see:

- A turn is acknowledged only after the commit that holds it succeeded.
- A turn that fails its own checks (``ConflictError`` on ``expect_last_seq``
  and the like) fails alone: the append raises those before writing
  anything, so the transaction is left as it was and the rest of the batch
  goes on.
- Anything else (a driver error, a failed commit) rolls the whole batch
  back: no turn of it is half-written and none is acknowledged. Each of its
  turns is then run again on its own, with the store's usual retries; the
  turn_id makes that safe even when the commit's outcome was unknown, and
  a turn that is bad on its own fails alone there instead of taking the
  others with it.
- Turns of one conversation keep the order they arrived in, so a batch
  writes them in sequence and the later sees the earlier (gapless seqs;
  a repeated turn_id is a duplicate of the first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["GroupCommit", "Outcome"]

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")


@dataclass
class Outcome(Generic[R]):
    """One turn's result in a committed batch: a value, or the error it alone raised."""

    value: R | None = None
    error: BaseException | None = None


@dataclass
class _Waiting(Generic[I, R]):
    item: I
    future: asyncio.Future[R] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit(Generic[I, R]):
    """One writer task per event loop, committing waiting items in batches.

    ``batch(items)`` writes the items in one transaction and returns one
    :class:`Outcome` each, or raises (the batch then failed as a whole);
    ``alone(item)`` writes one item with its own retries.
    """

    def __init__(
        self,
        batch: Callable[[Sequence[I]], Awaitable[list[Outcome[R]]]],
        alone: Callable[[I], Awaitable[R]],
        *,
        max_batch: int = 64,
    ) -> None:
        self._batch = batch
        self._alone = alone
        self._max_batch = max(1, max_batch)
        self._queue: list[_Waiting[I, R]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # committed batches and their turns: what the tests and benchmarks read
        self.batched = 0

    async def submit(self, item: I) -> R:
        waiting: _Waiting[I, R] = _Waiting(item)
        self._queue.append(waiting)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        # The writer owns the write: a caller that stops waiting does not stop it
        # (as with any append whose commit was under way, its retry finds the turn).
        return await asyncio.shield(waiting.future)

    async def aclose(self) -> None:
        """Wait for the writer to finish what it holds."""
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _drain(self) -> None:
        while self._queue:
            taken = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            await self._commit(taken)

    async def _commit(self, taken: list[_Waiting[I, R]]) -> None:
        try:
            outcomes = await self._batch([w.item for w in taken])
        except Exception:
            # Rolled back as a whole: each turn again on its own, concurrently.
            await asyncio.gather(*(self._run_alone(w) for w in taken))
            return
        except BaseException as exc:  # cancelled: nobody is told the turn was stored
            for w in taken:
                _settle(w.future, error=exc)
            raise
        self.batches += 1
        self.batched += len(taken)
        for w, outcome in zip(taken, outcomes, strict=True):
            _settle(w.future, value=outcome.value, error=outcome.error)

    async def _run_alone(self, w: _Waiting[I, R]) -> None:
        try:
            value = await self._alone(w.item)
        except BaseException as exc:
            _settle(w.future, error=exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _settle(w.future, value=value)


def _settle(future: asyncio.Future[R], *, value: R | None = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)  # type: ignore[arg-type]
