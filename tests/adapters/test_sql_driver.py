"""PostgreSQL's turn statements run on the asyncpg connection itself: its
errors reach the store as SQLAlchemy's would, and a connection lost or
cancelled under a statement never goes back into the pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from convcore_sql import SQLStore
from convcore_sql.driver import PgDriver, supports
from convcore_sql.errors import Kind, classify
from convcore_sql.tables import digest
from tests.helpers import turn
from tests.stores import unavailable
from tests.stores.sql import PG_URL, new_prefix, reachable, with_table_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
async def store() -> AsyncIterator[SQLStore]:
    if not reachable(PG_URL):
        unavailable(f"no PostgreSQL at {PG_URL}")
    store = SQLStore.from_url(with_table_prefix(PG_URL, new_prefix()), pool_size=2, max_overflow=0)
    await store.append_turn(turn("c", "t0"))
    try:
        yield store
    finally:
        await store.drop_tables()
        await store.aclose()


def _driver(store: SQLStore) -> PgDriver:
    assert supports(store.engine)
    return PgDriver(store.engine)


async def test_a_refused_write_is_the_integrity_error_sqlalchemy_raises(store: SQLStore) -> None:
    driver = _driver(store)
    read = driver.statement(store._sql.conversation)
    table = store.tables.conversations
    again = table.insert().from_select(
        list(table.c.keys()), table.select().where(table.c.conv_key == digest("c"))
    )
    with pytest.raises(IntegrityError) as raised:
        async with driver.connect() as conn:
            await conn.rows(again, {})
    assert classify(raised.value) is Kind.CONTENTION and not raised.value.connection_invalidated
    # The connection was fine: it went back to the pool and still answers.
    async with driver.connect() as conn:
        assert len(await conn.fetch(read, {"key": digest("c")})) == 1


async def test_a_lost_connection_is_invalidated_and_unavailable(store: SQLStore) -> None:
    driver = _driver(store)
    stmt = driver.statement(store._sql.conversation)
    with pytest.raises(DBAPIError) as raised:
        async with driver.connect() as conn:
            pid = conn._raw.get_server_pid()
            async with store.engine.connect() as admin:
                await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await asyncio.sleep(0.05)
            await conn.fetch(stmt, {"key": digest("c")})
    assert raised.value.connection_invalidated and classify(raised.value) is Kind.UNAVAILABLE
    for _ in range(3):  # no connection handed out is the dead one
        async with driver.connect() as conn:
            assert conn._raw.get_server_pid() != pid
            assert len(await conn.fetch(stmt, {"key": digest("c")})) == 1
    assert (await store.read_context("c", 100)).conversation is not None


async def test_a_statement_cancelled_midway_does_not_return_its_connection(store: SQLStore) -> None:
    driver = _driver(store)
    sleep = store._sql.conversation.where(text("pg_sleep(5) IS NOT NULL"))
    started = asyncio.Event()
    pids: list[int] = []

    async def slow() -> None:
        async with driver.connect() as conn:
            pids.append(conn._raw.get_server_pid())
            started.set()
            await conn.rows(sleep, {"key": digest("c")})

    task = asyncio.create_task(slow())
    await started.wait()
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3):
        async with driver.connect() as conn:
            assert conn._raw.get_server_pid() != pids[0]
    assert (await store.read_context("c", 100)).conversation is not None


async def test_text_read_escaped_and_decoded_never_share_a_cached_message(store: SQLStore) -> None:
    """PostgreSQL stores a backslash doubled: one message's text as the
    driver reads it can equal another's decoded text, every other value
    alike. Read one way, then the other, each reads back as itself."""
    await store.append_turn(turn("a", "t", "x\\y", "ok", tokens=(5, 5), created_at=1.0))
    await store.append_turn(turn("b", "t", "x\\\\y", "ok", tokens=(5, 5), created_at=1.0))
    assert [m.content for m in await store.read_tail("a", 10**6)] == ["x\\y", "ok"]

    def watch(*args: object) -> None:  # a listener keeps reads on SQLAlchemy
        pass

    event.listen(store.engine.sync_engine, "before_cursor_execute", watch)
    try:
        assert [m.content for m in await store.read_tail("b", 10**6)] == ["x\\\\y", "ok"]
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", watch)
    assert [m.content for m in await store.read_tail("a", 10**6)] == ["x\\y", "ok"]


async def test_the_pools_connections_go_first_come_first_served(store: SQLStore) -> None:
    driver = _driver(store)
    order: list[str] = []
    held = [driver.connect(), driver.connect()]  # the whole pool (pool_size=2)
    for conn in held:
        await conn.__aenter__()

    async def waiter() -> None:
        async with driver.connect():
            order.append("waited")

    queued = asyncio.create_task(waiter())
    for _ in range(20):  # the waiter asks, finds the pool empty and waits
        await asyncio.sleep(0)
    assert not order
    await held[0].__aexit__(None, None, None)
    # Asking again at once, before the waiter has run (a session finishing a
    # turn and starting its next): it must queue behind the waiter, not take
    # the connection just given back.
    async with driver.connect():
        order.append("asked after")
    await queued
    await held[1].__aexit__(None, None, None)
    assert order == ["waited", "asked after"]


async def test_the_gate_holds_as_many_as_the_pool(store: SQLStore) -> None:
    gate = _driver(store)._gate
    assert gate is not None and gate._value == 2  # pool_size=2, max_overflow=0


async def test_a_waiter_that_gives_up_leaves_the_pool_whole(store: SQLStore) -> None:
    driver = _driver(store)
    held = [driver.connect(), driver.connect()]
    for conn in held:
        await conn.__aenter__()

    async def waiter() -> None:
        async with driver.connect():
            pass

    gone = asyncio.create_task(waiter())
    for _ in range(20):
        await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    for conn in held:
        await conn.__aexit__(None, None, None)
    async with driver.connect(), driver.connect():  # both connections, at once, again
        pass
    assert driver._gate is not None and driver._gate._value == 2
