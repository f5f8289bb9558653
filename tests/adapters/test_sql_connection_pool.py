"""A SQLite file or PostgreSQL store keeps its connections: many turns at
once wait for a pooled connection instead of opening (and closing) more,
each of which would cost a thread, a file open and a schema parse (SQLite)
or a connect and a cold statement cache (PostgreSQL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import event

from convcore import open_store
from convcore_sql import SQLStore
from convcore_sql.urls import FIXED_POOL_SIZE
from tests.helpers import turn
from tests.stores import unavailable
from tests.stores.sql import PG_URL, new_prefix, reachable

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param(PG_URL, id="postgresql")])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/pool.db"
    if not reachable(request.param):
        unavailable(f"{request.param} is not reachable")
    return str(request.param)


async def test_concurrent_turns_reuse_a_fixed_pool_of_connections(url: str) -> None:
    store = open_store(url, table_prefix=new_prefix())
    assert isinstance(store, SQLStore)
    opened = 0

    def count(*_args: object) -> None:
        nonlocal opened
        opened += 1

    event.listen(store.engine.sync_engine, "connect", count)
    sessions = 4 * FIXED_POOL_SIZE
    try:

        async def session(i: int) -> None:
            for t in range(3):
                await store.read_context(f"c{i}", 1000)
                await store.append_turn(turn(f"c{i}", f"c{i}-{t}", f"q{t}", f"a{t}"))

        await asyncio.gather(*(session(i) for i in range(sessions)))
        # The schema bootstrap may use one connection of its own before the pool's.
        assert 1 <= opened <= FIXED_POOL_SIZE + 1
        for i in range(sessions):
            assert [m.seq for m in await store.read_messages(f"c{i}")] == list(range(1, 7))
    finally:
        await store.drop_tables()
        await store.aclose()


async def test_pool_options_given_to_the_store_still_win(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/own.db", pool_size=2, max_overflow=1)
    assert isinstance(store, SQLStore)
    try:
        pool = store.engine.sync_engine.pool
        assert (pool.size(), pool._max_overflow) == (2, 1)  # type: ignore[attr-defined]
    finally:
        await store.aclose()
