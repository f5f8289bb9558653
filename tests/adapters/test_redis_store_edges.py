"""RedisStore at its edges (huge turns, unreadable records, the
decoded-message cache across delete + recreate, cluster index healing,
the pool an owned client closes). Keys live under ``ccrev:<uuid>``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from convcore import InvalidRequestError, StorageError, StorageUnavailableError, TurnWrite, open_store
from convcore_redis import RedisStore
from convcore_redis.keys import ConversationKeys
from tests.helpers import draft, turn
from tests.stores.redis import REDIS_URL, delete_prefix, require_cluster, require_redis

pytestmark = pytest.mark.anyio


@pytest.fixture
async def prefix(client: aioredis.Redis) -> AsyncIterator[str]:
    p = f"ccrev:{uuid.uuid4().hex}"
    yield p
    await delete_prefix(client, p)


def _history(conv_uid: str, turn_id: str, n: int, size: int = 1) -> TurnWrite:
    return TurnWrite(
        conv_uid=conv_uid,
        turn_id=turn_id,
        messages=tuple(
            draft("user" if i % 2 == 0 else "assistant", f"{i}:" + "x" * size, 1, starts_round=i % 2 == 0)
            for i in range(n)
        ),
        encoding="cl100k_base",
        prompt_tokens=0,
        completion_tokens=0,
        created_at=time.time(),
    )


async def test_a_turn_past_luas_unpack_limit(client: aioredis.Redis, prefix: str) -> None:
    """unpack() fails past ~8,000 values: 4,100 messages are 8,200 of them."""
    store = RedisStore(client, prefix=prefix)
    result = await store.append_turn(_history("c", "h", 4_100))
    assert result.conversation.message_count == 4_100
    msgs = await store.read_messages("c")
    assert [m.seq for m in msgs] == list(range(1, 4_101))
    # cum holds tokens-before for every seq: the tail of 10 tokens is 10 messages.
    assert [m.seq for m in await store.read_tail("c", 10)] == list(range(4_091, 4_101))
    assert (await store.append_turn(_history("c", "h", 4_100))).duplicate


@pytest.mark.redis
async def test_multi_megabyte_messages_round_trip() -> None:
    await require_redis()
    store = open_store(REDIS_URL, prefix=f"ccrev:{uuid.uuid4().hex}")
    try:
        await store.append_turn(_history("c", "h", 4, size=3_000_000))
        msgs = await store.read_messages("c")
        assert [len(m.content) for m in msgs] == [3_000_002] * 4
        ctx = await store.read_context("c", 10)
        assert [m.seq for m in ctx.tail] == [1, 2, 3, 4]
    finally:
        await delete_prefix(store.client, store.prefix)
        await store.aclose()


async def test_unreadable_records_are_storage_errors_in_read_context(
    client: aioredis.Redis, prefix: str
) -> None:
    store = RedisStore(client, prefix=prefix)
    await store.append_turn(turn("c", "t"))
    await client.hset(ConversationKeys.of(prefix, "c").msgs, "2", b"not json")
    with pytest.raises(StorageError, match="unreadable"):
        await store.read_context("c", 1_000)
    with pytest.raises(StorageError, match="unreadable"):
        await store.read_context("c", 1_000, turn_id="t")
    await client.hset(ConversationKeys.of(prefix, "c").meta, "conv", "{")
    with pytest.raises(StorageError, match="unreadable"):
        await store.read_context("c", 1_000)


async def test_cache_is_not_fooled_by_delete_and_recreate(client: aioredis.Redis, prefix: str) -> None:
    """Same conv_uid, turn_id and timestamp, other content: the cache is
    keyed by the stored bytes, so the new content is what comes back."""
    store = RedisStore(client, prefix=prefix)
    await store.append_turn(turn("c", "t", "old q", "old a", created_at=1_700_000_000.0))
    assert [m.content for m in await store.read_tail("c", 1_000)] == ["old q", "old a"]
    assert await store.delete_conversation("c")
    await store.append_turn(turn("c", "t", "new q", "new a", created_at=1_700_000_000.0))
    assert [m.content for m in await store.read_tail("c", 1_000)] == ["new q", "new a"]
    assert [m.content for m in (await store.read_context("c", 1_000)).tail] == ["new q", "new a"]


@pytest.mark.cluster
async def test_a_lost_index_round_is_healed_by_the_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cluster: the turn is stored, the index bump fails, the call raises;
    the retry with the same turn_id is a duplicate and lists it."""
    store = open_store(require_cluster(), prefix=f"ccrev:{uuid.uuid4().hex}")
    try:
        real = RedisStore._bump_indexes
        calls = 0

        async def flaky(self: RedisStore, conv_uid: str, meta: dict[str, str]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RedisConnectionError("lost between the two rounds")
            await real(self, conv_uid, meta)

        monkeypatch.setattr(RedisStore, "_bump_indexes", flaky)
        w = turn("c", "t", user_name="ann", sys_code="x")
        with pytest.raises(StorageUnavailableError):
            await store.append_turn(w)
        assert await store.get_turn("c", "t") is not None
        assert await store.list_conversations(user_name="ann") == []
        again = await store.append_turn(w)
        assert again.duplicate
        for filters in ({}, {"user_name": "ann"}, {"sys_code": "x"}, {"user_name": "ann", "sys_code": "x"}):
            assert [c.conv_uid for c in await store.list_conversations(**filters)] == ["c"], filters
    finally:
        await delete_prefix(store.client, store.prefix)
        await store.aclose()


@pytest.mark.redis
async def test_aclose_disconnects_the_blocking_pool() -> None:
    await require_redis()
    store = open_store(REDIS_URL + "?socket_timeout=5", prefix=f"ccrev:{uuid.uuid4().hex}")
    await store.append_turn(turn("c", "t"))
    pool = store.client.connection_pool
    assert isinstance(pool, aioredis.BlockingConnectionPool)
    assert pool.connection_kwargs["socket_timeout"] == 5.0
    await delete_prefix(store.client, store.prefix)
    connections = list(pool._available_connections) + list(pool._in_use_connections)
    assert connections and any(c.is_connected for c in connections)
    await store.aclose()
    assert not any(c.is_connected for c in connections)


def test_prefixes_are_checked_in_urls_too() -> None:
    with pytest.raises(InvalidRequestError, match="brace-free") as info:
        open_store("redis://127.0.0.1:1/0?prefix=a%7Bb")
    assert info.value.field == "store_url"
    with pytest.raises(InvalidRequestError, match="non-empty"):
        open_store("redis://127.0.0.1:1/0?prefix=")
