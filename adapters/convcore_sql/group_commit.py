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
from dataclasses import dataclass
from typing import Generic, TypeVar

from convcore.single_writer import Pending, SingleWriter

__all__ = ["GroupCommit", "Outcome"]

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")


@dataclass
class Outcome(Generic[R]):
    """One turn's result in a committed batch: a value, or the error it alone raised."""

    value: R | None = None
    error: BaseException | None = None


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
        # The writer owns the write: a caller that stops waiting does not stop it
        # (as with any append whose commit was under way, its retry finds the turn).
        self._writer: SingleWriter[I, R] = SingleWriter(self._commit, max_batch=max_batch, shielded=True)
        self.batches = 0  # committed batches and their turns: what the tests and benchmarks read
        self.batched = 0

    async def submit(self, item: I) -> R:
        return await self._writer.submit(item)

    async def aclose(self) -> None:
        """Wait for the writer to finish what it holds."""
        await self._writer.aclose()

    async def _commit(self, taken: list[Pending[I, R]]) -> None:
        try:
            outcomes = await self._batch([w.item for w in taken])
        except Exception:
            # Rolled back as a whole: each turn again on its own, concurrently.
            await asyncio.gather(*(self._run_alone(w) for w in taken))
            return
        self.batches += 1
        self.batched += len(taken)
        for w, outcome in zip(taken, outcomes, strict=True):
            w.settle(value=outcome.value, error=outcome.error)

    async def _run_alone(self, w: Pending[I, R]) -> None:
        try:
            value = await self._alone(w.item)
        except BaseException as exc:
            w.settle(error=exc)
            if not isinstance(exc, Exception):
                raise
        else:
            w.settle(value=value)
