"""SQLite's reads and batches in one trip to aiosqlite's thread: a turn's
context is read in one trip, reads waiting together share one, each read's
error is its own, the connection goes back to the pool without a ROLLBACK
of nothing, an engine whose statements are watched reads through
SQLAlchemy (its listeners see the reads), and every path reads the same."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, literal, update
from sqlalchemy.dialects import mysql, postgresql, sqlite

from convcore import FunctionCall, MessageDraft, StorageError, ToolCall, TurnContext
from convcore_sql import SQLStore
from convcore_sql.sqlite_trip import NoThreadHook, ThreadDB
from convcore_sql.statements import CONV_COLUMNS
from convcore_sql.tables import LongText, digest
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
    assert trips == ["_reads_in_thread"]
    assert resets == [True]  # no ROLLBACK trip on return
    assert [m.seq for m in ctx.tail] == [1, 2, 3]
    stored = await store.read_context("c", 10**6, turn_id="t1")  # the stored turn in the same trip
    assert trips == ["_reads_in_thread"] * 2
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


def _busy() -> sqlite3.OperationalError:
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
    return busy


async def test_a_failed_trip_is_reset_and_its_reads_retried(store: SQLStore, resets: list[bool]) -> None:
    """A trip that fails as a whole leaves the connection to the pool's
    reset (a ROLLBACK), and its reads are retried as any other."""
    await _stored(store)
    assert store._trip is not None
    original = store._trip._reads_in_thread
    failures: list[int] = []

    def flaky(raw: Any, works: Any) -> Any:
        if not failures:
            failures.append(1)
            raise _busy()
        return original(raw, works)

    store._trip._reads_in_thread = flaky  # type: ignore[method-assign]
    resets.clear()
    ctx = await store.read_context("c", 10**6)
    assert failures == [1] and [m.seq for m in ctx.tail] == [1, 2, 3]
    assert resets == [False, True]


async def test_reads_waiting_together_share_a_trip_and_read_the_same(store: SQLStore) -> None:
    await _stored(store)
    for i in range(4):
        await store.append_turn(turn(f"o{i}", "t", question=f"o{i}"))
    convs = ["c", "o0", "o1", "o2", "o3", "none"]
    alone = [await store.read_context(c, 10**6) for c in convs]
    trips = _trips(store)
    together = await asyncio.gather(*(store.read_context(c, 10**6) for c in convs * 5))
    assert len(trips) < len(together) / 2
    assert list(together) == alone * 5


async def test_a_read_that_fails_in_a_shared_trip_fails_alone(
    store: SQLStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _stored(store)
    fetch = ThreadDB.fetch
    broken = {digest("bad"): sqlite3.OperationalError("disk I/O error"), digest("busy"): _busy()}

    def failing(self: ThreadDB, stmt: Any, params: dict[str, Any]) -> list[Any]:
        error = broken.pop(params["key"], None)
        if error is not None:
            raise error
        return fetch(self, stmt, params)

    monkeypatch.setattr(ThreadDB, "fetch", failing)
    trips = _trips(store)
    ok, bad, busy = await asyncio.gather(
        store.read_context("c", 10**6),
        store.read_context("bad", 10**6),
        store.read_context("busy", 10**6),
        return_exceptions=True,
    )
    assert trips[0] == "_reads_in_thread" and len(trips) == 2  # one shared, then the retry
    assert isinstance(ok, TurnContext) and [m.seq for m in ok.tail] == [1, 2, 3]
    assert isinstance(bad, StorageError) and "disk I/O error" in str(bad)  # not retried
    assert busy == TurnContext(conversation=None)  # retried, and read


async def test_a_reader_gone_before_its_trip_is_skipped(store: SQLStore) -> None:
    trip = store._trip
    assert trip is not None
    gate = threading.Event()
    first = asyncio.create_task(trip.read(lambda db: gate.wait(5)))
    await asyncio.sleep(0.05)  # its trip under way
    ran: list[int] = []
    second = asyncio.create_task(trip.read(lambda db: ran.append(1)))
    await asyncio.sleep(0)
    second.cancel()
    gate.set()
    assert await first is True
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await trip.read(lambda db: 3) == 3
    assert ran == []


async def test_a_driver_without_the_thread_hook_reads_through_sqlalchemy(store: SQLStore) -> None:
    await _stored(store)

    async def no_hook(work: Any) -> Any:
        raise NoThreadHook("no hook here")

    assert store._trip is not None
    store._trip.read = no_hook  # type: ignore[method-assign]
    ctx = await store.read_context("c", 10**6)
    assert store._trip is None  # not tried again
    assert [m.seq for m in ctx.tail] == [1, 2, 3]


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


def test_text_is_processed_on_postgresql_alone() -> None:
    """Text is escaped on PostgreSQL only: elsewhere a value goes to the
    driver and comes back with no call per value."""
    for dialect in (sqlite.dialect(), mysql.dialect(), mysql.dialect(is_mariadb=True)):
        assert LongText._cached_bind_processor(dialect) is None
        assert LongText._cached_result_processor(dialect, None) is None
    pg = postgresql.dialect()
    escape = LongText._cached_bind_processor(pg)
    unescape = LongText._cached_result_processor(pg, None)
    assert escape is not None and unescape is not None
    assert escape("a\\b\x00") == "a\\\\b\\0" and unescape("a\\\\b\\0") == "a\\b\x00"


async def test_driver_arguments_follow_the_statements_parameters(store: SQLStore) -> None:
    """Parameters in the compiled order, repeated where the SQL repeats
    them, processed by their types (JSON, booleans), and the statement's
    own values in place."""
    assert store._trip is not None
    context = store._trip.statement(store._sql.context)
    key, turn_key = digest("c"), digest("t")
    assert context.args({"key": key, "turn_key": turn_key, "budget": 7}) == [key, turn_key, key, 7, key]
    insert = store._trip.statement(store._sql.insert_messages, ("conv_key", "seq", "starts_round", "parts"))
    row = {"conv_key": key, "seq": 3, "starts_round": True, "parts": [{"type": "text"}]}
    assert sorted(map(str, insert.args(row))) == sorted([key, "3", "1", '[{"type": "text"}]'])
    counted = store._trip.statement(update(store.tables.conversations).values(message_count=literal(5)))
    assert counted.args({}) == [5]


async def test_the_reads_of_a_trip_share_one_snapshot(store: SQLStore, tmp_path: Any) -> None:
    """A context is two statements on SQLite (the row, then its tail):
    a commit landing between them must not show in the second, or the tail
    could hold messages the row does not count."""
    await _stored(store)
    assert store._trip is not None
    params = {"key": digest("c"), "turn_key": "", "budget": 0}

    count = CONV_COLUMNS.index("message_count")

    def counts(db: ThreadDB) -> tuple[int, int]:
        before = db.fetch(store._sql.head, params)[0][count]
        other = sqlite3.connect(tmp_path / "trip.db")
        try:
            other.execute("UPDATE trip_conversations SET message_count = message_count + 100")
            other.commit()
        finally:
            other.close()
        after = db.fetch(store._sql.head, params)[0][count]
        return before, after

    assert await store._trip.read(counts) == (3, 3)
    conv = await store.get_conversation("c")
    assert conv is not None and conv.message_count == 103  # committed, and seen by the next read
