"""The single-writer queue the stores batch through: what arrives together
is flushed together, every caller gets its own answer, and a failed flush
answers each of its callers with the failure."""

from __future__ import annotations

import asyncio

import pytest

from convcore.single_writer import Pending, SingleWriter

pytestmark = pytest.mark.anyio


class Recorder:
    """A flush that answers each item doubled, and records its batches; it
    waits on ``gate`` (when set) so callers can queue while it is busy."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, batch: list[Pending[int, int]]) -> None:
        self.batches.append([p.item for p in batch])
        if self.gate is not None:
            await self.gate.wait()
        for p in batch:
            if not p.future.done():
                p.settle(value=2 * p.item)


async def test_a_lone_item_is_flushed_at_once() -> None:
    flush = Recorder()
    writer: SingleWriter[int, int] = SingleWriter(flush, max_batch=8, shielded=False)
    assert await writer.submit(21) == 42
    assert flush.batches == [[21]]


async def test_items_queued_while_a_flush_is_busy_are_the_next_batch() -> None:
    flush = Recorder()
    flush.gate = asyncio.Event()
    writer: SingleWriter[int, int] = SingleWriter(flush, max_batch=3, shielded=False)
    first = asyncio.ensure_future(writer.submit(0))
    await asyncio.sleep(0)  # the writer takes item 0 and waits on the gate
    rest = [asyncio.ensure_future(writer.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    flush.gate.set()
    assert await asyncio.gather(first, *rest) == [0, 2, 4, 6, 8, 10]
    # Five waited behind the first batch: two batches of at most three, in order.
    assert flush.batches == [[0], [1, 2, 3], [4, 5]]


async def test_a_flush_that_raises_answers_each_caller_with_its_error() -> None:
    async def broken(batch: list[Pending[int, int]]) -> None:
        batch[0].settle(value=1)  # answered before the failure: keeps its answer
        raise ConnectionError("gone")

    writer: SingleWriter[int, int] = SingleWriter(broken, max_batch=8, shielded=False)
    results = await asyncio.gather(*(writer.submit(i) for i in range(3)), return_exceptions=True)
    assert results[0] == 1
    assert all(isinstance(r, ConnectionError) for r in results[1:])
    # Later items start a new writer, which flushes them in turn.
    later = await asyncio.gather(writer.submit(8), writer.submit(9), return_exceptions=True)
    assert later[0] == 1 and isinstance(later[1], ConnectionError)


async def test_an_item_the_flush_leaves_unanswered_gets_an_error() -> None:
    async def forgetful(batch: list[Pending[int, int]]) -> None:
        return None

    writer: SingleWriter[int, int] = SingleWriter(forgetful, max_batch=8, shielded=True)
    with pytest.raises(RuntimeError, match="unanswered"):
        await writer.submit(1)


@pytest.mark.parametrize("shielded", [False, True])
async def test_a_caller_that_stops_waiting(shielded: bool) -> None:
    """Unshielded, the item of a caller who left before its batch was taken
    is seen as done (the flush skips it); shielded, it is written anyway."""
    flush = Recorder()
    flush.gate = asyncio.Event()
    writer: SingleWriter[int, int] = SingleWriter(flush, max_batch=8, shielded=shielded)
    busy = asyncio.ensure_future(writer.submit(0))
    await asyncio.sleep(0)
    leaving = asyncio.ensure_future(writer.submit(1))
    staying = asyncio.ensure_future(writer.submit(2))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    seen: list[list[bool]] = []
    original = flush.__call__

    async def watching(batch: list[Pending[int, int]]) -> None:
        seen.append([p.future.done() for p in batch])
        await original(batch)

    writer._flush = watching  # the next batch is watched
    flush.gate.set()
    assert await busy == 0 and await staying == 4
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert seen == [[not shielded, False]]
    await writer.aclose()
