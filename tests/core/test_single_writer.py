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


async def test_with_two_writers_a_batch_goes_out_while_the_other_is_busy() -> None:
    flush = Recorder()
    flush.gate = asyncio.Event()
    writer: SingleWriter[int, int] = SingleWriter(flush, max_batch=8, shielded=False, writers=2)
    first = asyncio.ensure_future(writer.submit(0))
    await asyncio.sleep(0)  # the first writer takes item 0 and waits on the gate
    second = [asyncio.ensure_future(writer.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # a second writer takes them without waiting for the first
    assert flush.batches == [[0], [1, 2]]
    third = [asyncio.ensure_future(writer.submit(i)) for i in (3, 4)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert flush.batches == [[0], [1, 2]], "both writers busy: no third one starts"
    flush.gate.set()
    assert await asyncio.gather(first, *second, *third) == [0, 2, 4, 6, 8]
    assert flush.batches == [[0], [1, 2], [3, 4]]
    await writer.aclose()


async def test_items_that_arrive_together_are_one_batch_whatever_the_writers() -> None:
    """A second writer starts only when none is on its way to the queue."""
    flush = Recorder()
    writer: SingleWriter[int, int] = SingleWriter(flush, max_batch=64, shielded=False, writers=4)
    assert await asyncio.gather(*(writer.submit(i) for i in range(10))) == [2 * i for i in range(10)]
    assert flush.batches == [list(range(10))]


async def test_aclose_waits_for_every_busy_writer() -> None:
    flush = Recorder()
    flush.gate = asyncio.Event()
    writer: SingleWriter[int, int] = SingleWriter(flush, max_batch=8, shielded=True, writers=2)
    calls = [asyncio.ensure_future(writer.submit(0))]
    await asyncio.sleep(0)
    calls.append(asyncio.ensure_future(writer.submit(1)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(writer.aclose())
    await asyncio.sleep(0)
    assert not closing.done() and flush.batches == [[0], [1]]
    flush.gate.set()
    await closing
    assert all(c.done() for c in calls) and [c.result() for c in calls] == [0, 2]


@pytest.mark.parametrize("writers", [1, 2])
def test_a_writer_left_unstarted_by_a_closed_loop_does_not_stall_the_next_one(writers: int) -> None:
    """A store can outlive an event loop: a writer that the old loop
    cancelled before it ever ran must not count as one on its way."""
    flush = Recorder()
    writer: SingleWriter[int, int] = SingleWriter(flush, max_batch=8, shielded=False, writers=writers)
    old = asyncio.new_event_loop()
    try:
        call = old.create_task(writer.submit(1))
        old.call_soon(old.stop)  # stops once the call is queued and its writer created, not run
        old.run_forever()
        left = asyncio.all_tasks(old)
        assert call in left and len(left) == 2  # the call and its writer
        for task in left:
            task.cancel()
        old.run_until_complete(asyncio.gather(*left, return_exceptions=True))
    finally:
        old.close()
    assert flush.batches == []

    async def next_loop() -> int:
        return await asyncio.wait_for(writer.submit(2), timeout=10)

    assert asyncio.run(next_loop()) == 4
