"""Concurrent calls of a single-server RedisStore share writes: what one
batch holds, and that each call still gets its own reply or error, across
an error reply, a forgotten script, a broken connection and a caller that
leaves before its call is sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from convcore import StorageError, StorageUnavailableError, open_store
from convcore_redis import RedisStore
from convcore_redis.keys import ConversationKeys
from tests.adapters.redis_servers import own_redis_server
from tests.adapters.test_redis_store import Trips
from tests.helpers import turn
from tests.stores.redis import REDIS_URL, delete_prefix, new_prefix, require_redis

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(client: aioredis.Redis) -> AsyncIterator[RedisStore]:
    prefix = new_prefix()
    s = RedisStore(client, prefix=prefix)
    yield s
    await s.aclose()
    await delete_prefix(client, prefix)


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Trips:
    return Trips(monkeypatch)


async def test_concurrent_turns_share_writes(store: RedisStore, trips: Trips) -> None:
    await store.append_turn(turn("warm", "t0"))  # connects and loads the scripts
    trips.take()
    results = await asyncio.gather(*(store.append_turn(turn(f"c{i % 8}", f"t{i}")) for i in range(64)))
    assert trips.take() < 8, "64 appends in flight together went out in a few writes"
    assert not any(r.duplicate for r in results)
    for i in range(8):
        seqs = [m.seq for m in await store.read_messages(f"c{i}")]
        assert seqs == list(range(1, 17)), "8 turns of one conversation, gapless"
    contexts = await asyncio.gather(*(store.read_context(f"c{i}", 1000) for i in range(8)))
    assert [c.conversation.message_count for c in contexts if c.conversation] == [16] * 8


async def test_a_lone_call_goes_out_at_once(store: RedisStore, trips: Trips) -> None:
    await store.append_turn(turn("c", "t0"))
    trips.take()
    await store.append_turn(turn("c", "t1"))
    assert trips.take() == 1


async def test_an_error_reply_fails_only_its_own_call(store: RedisStore, client: aioredis.Redis) -> None:
    await store.append_turn(turn("good", "t0"))
    await client.set(ConversationKeys.of(store.prefix, "bad").meta, "not a hash")
    bad, good = await asyncio.gather(
        store.read_context("bad", 100), store.read_context("good", 100), return_exceptions=True
    )
    assert isinstance(bad, StorageError)
    assert not isinstance(good, BaseException) and good.conversation is not None
    assert [m.seq for m in good.tail] == [1, 2]


async def test_a_script_the_server_does_not_know_is_loaded_and_run(store: RedisStore) -> None:
    await store.append_turn(turn("c", "t0"))
    real = store._read_context.sha
    store._read_context.sha = "0" * 40  # as after a restart that lost the scripts
    context, again = await asyncio.gather(store.read_context("c", 100), store.read_context("c", 100))
    assert [m.seq for m in context.tail] == [m.seq for m in again.tail] == [1, 2]
    assert store._read_context.sha == real


async def test_a_caller_that_leaves_before_the_write_sends_nothing(store: RedisStore) -> None:
    await store.append_turn(turn("warm", "t0"))
    kept = asyncio.ensure_future(store.append_turn(turn("kept", "t0")))
    left = asyncio.ensure_future(store.append_turn(turn("left", "t0")))
    await asyncio.sleep(0)  # both queued; the writer runs after this task resumes
    left.cancel()
    await kept
    with pytest.raises(asyncio.CancelledError):
        await left
    assert await store.get_conversation("left") is None
    assert await store.get_conversation("kept") is not None


@pytest.mark.redis
async def test_a_connection_broken_mid_batch_sends_the_unanswered_calls_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await require_redis()
    prefix = new_prefix()
    store = open_store(REDIS_URL, prefix=prefix)
    assert isinstance(store, RedisStore)
    try:
        await store.append_turn(turn("warm", "t0"))
        pool = store.client.connection_pool
        real_get = pool.get_connection
        broke = asyncio.Event()

        async def get_connection(*args: Any, **kwargs: Any) -> Any:
            conn = await real_get(*args, **kwargs)
            if broke.is_set():
                return conn
            real_read = conn.read_response
            reads = 0

            async def read_response(*a: Any, **k: Any) -> Any:
                nonlocal reads
                reads += 1
                if reads == 3 and not broke.is_set():  # two replies read, six sent and unread
                    broke.set()
                    await conn.disconnect()
                    raise redis.exceptions.ConnectionError("connection lost")
                return await real_read(*a, **k)

            monkeypatch.setattr(conn, "read_response", read_response)
            return conn

        monkeypatch.setattr(pool, "get_connection", get_connection)
        results = await asyncio.gather(*(store.append_turn(turn(f"c{i}", "t0")) for i in range(8)))
        assert broke.is_set()
        # The server ran every append of the first send; those sent again answer as duplicates.
        assert [r.duplicate for r in results[:2]] == [False, False]
        assert all(r.turn.turn_id == "t0" and r.conversation.message_count == 2 for r in results)
        for i in range(8):
            assert [m.seq for m in await store.read_messages(f"c{i}")] == [1, 2], "stored once"
    finally:
        await delete_prefix(store.client, prefix)
        await store.aclose()


async def test_replies_that_do_not_come_in_time_fail_their_calls_as_unavailable(tmp_path: Path) -> None:
    server = own_redis_server(tmp_path, ["--enable-debug-command", "local"])
    store = open_store(server.url, prefix="cctest:slow", socket_connect_timeout=0.3, socket_timeout=0.3)
    other = aioredis.Redis.from_url(server.url)
    try:
        await store.append_turn(turn("c", "t0"))
        sleeping = asyncio.create_task(other.execute_command("DEBUG", "SLEEP", "3"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        results = await asyncio.gather(*(store.read_tail("c", 100) for _ in range(4)), return_exceptions=True)
        assert all(isinstance(r, StorageUnavailableError) for r in results), results
        assert time.monotonic() - started < 2.5, "timed out rather than waited for the server"
        await sleeping
        assert [m.seq for m in await store.read_tail("c", 100)] == [1, 2], "and served again once it answers"
    finally:
        await other.aclose()
        await store.aclose()
        server.stop()


async def test_a_cluster_or_a_single_connection_client_is_not_batched(client: aioredis.Redis) -> None:
    assert RedisStore(client)._batcher is not None
    assert RedisStore(client, autopipeline=False)._batcher is None
    single = aioredis.Redis(single_connection_client=True)
    assert RedisStore(single)._batcher is None
    await single.aclose()
