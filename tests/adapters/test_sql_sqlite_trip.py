"""SQLite's reads and batches in one trip to aiosqlite's thread: a turn's
context is read in one trip, the connection goes back to the pool without
a ROLLBACK of nothing, an engine whose statements are watched reads through
SQLAlchemy (its listeners see the reads), and every path reads the same."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event

from convcore import FunctionCall, MessageDraft, ToolCall, TurnContext
from convcore_sql import SQLStore
from tests.helpers import draft, turn

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Any) -> AsyncIterator[SQLStore]:
    s = SQLStore.from_url(f"sqlite:///{tmp_path / 'trip.db'}", table_prefix="trip_")
    await s.get_conversation("warm")  # schema in place
    yield s
    await s.aclose()


def _trips(store: SQLStore) -> list[str]:
    """What runs in the driver's thread from now on: a function name each trip."""
    assert store._trip is not None
    seen: list[str] = []
    original = type(store._trip)._run

    async def counted(self: Any, in_thread: Any, work: Any) -> Any:
        seen.append(getattr(in_thread, "__name__", "?"))
        return await original(self, in_thread, work)

    store._trip._run = counted.__get__(store._trip)  # type: ignore[method-assign]
    return seen


@pytest.fixture
def resets(store: SQLStore) -> Any:
    """The pool's resets of returned connections: whether each found its
    transaction already ended (no ROLLBACK sent)."""
    seen: list[bool] = []

    def reset(dbapi_conn: Any, record: Any, state: Any) -> None:
        seen.append(state.transaction_was_reset)

    pool = store.engine.sync_engine.pool
    event.listen(pool, "reset", reset)
    yield seen
    event.remove(pool, "reset", reset)


async def _stored(store: SQLStore) -> None:
    calls = (ToolCall(id="call_1", function=FunctionCall(name="f", arguments='{"a": "\\u0000"}')),)
    asked = turn("c", "t1", "weather?", "", system=(draft("system", "be brief"),))
    calling = asked.messages[1].model_copy(update={"tool_calls": calls})
    await store.append_turn(asked.model_copy(update={"messages": (asked.messages[0], calling)}))
    answer = MessageDraft(role="tool", content="sunny", tool_call_id="call_1", token_count=8)
    await store.append_turn(turn("c", "t2").model_copy(update={"messages": (answer,)}))


async def test_a_context_is_read_in_one_trip_and_returned_without_a_rollback(
    store: SQLStore, resets: list[bool]
) -> None:
    await _stored(store)
    trips = _trips(store)
    resets.clear()
    ctx = await store.read_context("c", 10**6)
    assert trips == ["_read_in_thread"]
    assert resets == [True]  # no ROLLBACK trip on return
    assert [m.seq for m in ctx.tail] == [1, 2, 3]
    stored = await store.read_context("c", 10**6, turn_id="t1")  # the stored turn in the same trip
    assert trips == ["_read_in_thread"] * 2
    assert stored.turn is not None and [m.seq for m in stored.turn.messages] == [1, 2]
    assert await store.read_tail("c", 10**6) == list(ctx.tail)
    assert len(trips) == 3 and resets == [True] * 3


async def test_a_committed_batch_goes_back_to_the_pool_without_a_rollback(
    store: SQLStore, resets: list[bool]
) -> None:
    trips = _trips(store)
    await asyncio.gather(*(store.append_turn(turn(f"b{i}", "t")) for i in range(5)))
    assert trips and set(trips) == {"_in_thread"}
    assert resets == [True] * len(trips)


async def test_a_read_that_fails_in_the_thread_is_reset_and_retried(
    store: SQLStore, resets: list[bool]
) -> None:
    """A driver error in the trip leaves the connection to the pool's reset
    (a ROLLBACK), and the read is retried as any other."""
    await _stored(store)
    assert store._trip is not None
    original = store._trip._read_in_thread
    failures: list[int] = []

    def flaky(raw: Any, work: Any) -> Any:
        if not failures:
            failures.append(1)
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
            raise busy
        return original(raw, work)

    store._trip._read_in_thread = flaky  # type: ignore[method-assign]
    resets.clear()
    ctx = await store.read_context("c", 10**6)
    assert failures == [1] and [m.seq for m in ctx.tail] == [1, 2, 3]
    assert resets == [False, True]


async def test_batch_reads_compile_a_few_in_list_shapes(store: SQLStore) -> None:
    """The batch's IN lists are compiled per power of two of their length,
    not per length: a handful of shapes whatever the batch sizes."""
    for n in range(1, 10):
        await asyncio.gather(*(store.append_turn(turn(f"s{n}-{i}", "t")) for i in range(n)))
    assert store._trip is not None
    sizes = {size for _, size in store._trip._lists}
    assert sizes <= {1, 2, 4, 8, 16}
    for n in range(1, 10):
        for i in range(n):
            assert (await store.get_conversation(f"s{n}-{i}")) is not None


async def test_a_watched_engine_reads_through_sqlalchemy_and_reads_the_same(store: SQLStore) -> None:
    await _stored(store)
    on_driver = [
        await store.read_context("c", 10**6),
        await store.read_context("c", 10**6, turn_id="t2"),
        await store.read_context("c", 5),
        await store.read_context("c", -1),
        await store.read_context("none", 10**6),
    ]
    tail = await store.read_tail("c", 10**6)
    seen: list[str] = []

    def before(conn: Any, cursor: Any, sql: str, *rest: Any) -> None:
        seen.append(sql.lstrip().split()[0].upper())

    event.listen(store.engine.sync_engine, "before_cursor_execute", before)
    try:
        store._messages = type(store._messages)()  # nothing read before is reused
        watched: list[TurnContext] = [
            await store.read_context("c", 10**6),
            await store.read_context("c", 10**6, turn_id="t2"),
            await store.read_context("c", 5),
            await store.read_context("c", -1),
            await store.read_context("none", 10**6),
        ]
        assert await store.read_tail("c", 10**6) == tail
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", before)
    assert seen and set(seen) == {"SELECT"}  # the listener saw the reads
    assert watched == on_driver
    assert on_driver[0].conversation is not None
    assert [m.content for m in on_driver[0].conversation.system] == ["be brief"]
    assert on_driver[1].turn is not None and on_driver[1].turn.turn_id == "t2"
    assert on_driver[0].tail[1].tool_calls is not None
