"""Four OS processes, each with its own engine and RedisStore.from_url, race
50 turns each at one conv_uid: none lost, none split, none duplicated."""

from __future__ import annotations

import multiprocessing
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from tests.adapters.redis_worker import run_turns
from tests.helpers import assert_race_kept_every_turn
from tests.stores import StoreFactory
from tests.stores.redis import cluster_factory, redis_factory

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PROCESSES = 4
TURNS = 50
CONV = "cross-process {shared}: conversation"


@pytest.fixture(
    params=[
        pytest.param(redis_factory, id="redis", marks=pytest.mark.redis),
        pytest.param(cluster_factory, id="redis-cluster", marks=pytest.mark.cluster),
    ]
)
async def factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as f:
        try:
            yield f
        finally:
            await f.cleanup()


async def test_four_processes_race_at_one_conversation(factory: StoreFactory) -> None:
    assert factory.url is not None
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        pending = pool.starmap_async(run_turns, [(factory.url, CONV, w, TURNS) for w in range(PROCESSES)])
        acknowledged = [rid for ids in pending.get(timeout=120) for rid in ids]
    assert len(acknowledged) == PROCESSES * TURNS

    store = factory.make()
    try:
        await assert_race_kept_every_turn(store, CONV, acknowledged)
    finally:
        await store.aclose()
