"""Behaviour of RedisStore that the contract suite cannot see: key layout and
slots, TTL, prefixes, round trips, owned clients, stale keys, error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from convcore import StorageError, StorageUnavailableError, open_store
from convcore_redis import RedisStore
from convcore_redis.keys import ConversationKeys, digest
from tests.adapters.redis_servers import free_port
from tests.contract.test_store_contract import ODD_UIDS
from tests.helpers import turn
from tests.stores.redis import REDIS_URL, delete_prefix, new_prefix, require_cluster, require_redis

pytestmark = pytest.mark.anyio


@pytest.fixture
async def prefix(client: aioredis.Redis) -> AsyncIterator[str]:
    p = new_prefix()
    yield p
    await delete_prefix(client, p)


async def keys_under(client: aioredis.Redis, prefix: str) -> set[str]:
    return {k.decode() async for k in client.scan_iter(match=f"{prefix}:*")}


# -- key layout ---------------------------------------------------------------


@pytest.mark.parametrize("conv_uid", [*ODD_UIDS, "{", "}", "{}", "a{b}c", ""], ids=repr)
def test_keys_of_a_conversation_share_one_slot(conv_uid: str) -> None:
    keys = ConversationKeys.of("convcore", conv_uid)
    slots = {key_slot(k.encode()) for k in keys.all()}
    assert len(slots) == 1
    assert all(k.startswith(f"convcore:{{{digest(conv_uid)}}}:") for k in keys.all())
    assert all(len(k) < 80 for k in keys.all()), "the raw uid is never part of a key"


def test_prefixes_with_braces_are_refused() -> None:
    client = fakeredis.FakeAsyncRedis()
    for bad in ["", "a{b", "x}", "{tag}"]:
        with pytest.raises(ValueError):
            RedisStore(client, prefix=bad)
    with pytest.raises(ValueError):
        RedisStore(client, ttl=0)


async def test_every_key_lives_under_the_prefix(client: aioredis.Redis, prefix: str) -> None:
    other = new_prefix()
    a, b = RedisStore(client, prefix=prefix), RedisStore(client, prefix=other)
    try:
        await a.append_turn(turn("c", "t1", user_name="ann", sys_code="x"))
        assert await b.get_conversation("c") is None
        assert await b.list_conversations() == []
        keys = await keys_under(client, prefix)
        assert len(keys) == 4 + 4  # meta, msgs, cum, turns; all, user, sys, user+sys indexes
        assert await keys_under(client, other) == set()
        assert await a.delete_conversation("c")
        idx = {k for k in await keys_under(client, prefix) if ":idx:" in k}
        assert await keys_under(client, prefix) == idx
        for key in idx:  # emptied indexes are gone (ZREM of the last member deletes)
            assert await client.zcard(key) == 0
    finally:
        await delete_prefix(client, other)


# -- TTL ----------------------------------------------------------------------


async def test_ttl_is_set_and_refreshed_on_every_key(client: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(client, prefix=prefix, ttl=1000)
    await store.append_turn(turn("c", "t1"))
    keys = ConversationKeys.of(prefix, "c").all()
    for key in keys:
        assert 990 <= await client.ttl(key) <= 1000
        await client.expire(key, 5)
    await store.append_turn(turn("c", "t2"))
    for key in keys:
        assert 990 <= await client.ttl(key) <= 1000, key


async def _index_members(client: Any, store: RedisStore) -> dict[str, set[str]]:
    """Each index of ann/x's conversations, by kind, with its members."""
    index = store._index
    keys = {
        "all": index.all,
        "user": index.user("ann"),
        "sys": index.sys("x"),
        "both": index.user_sys("ann", "x"),
    }
    return {kind: {m.decode() for m in await client.zrange(key, 0, -1)} for kind, key in keys.items()}


async def _drop_idle_entries(client: Any, store: RedisStore) -> None:
    # created_at stands in for the clock: scores are updated_at.
    await store.append_turn(turn("old", "t1", user_name="ann", sys_code="x", created_at=1000.0))
    await store.append_turn(turn("recent", "t1", user_name="ann", sys_code="x", created_at=1150.0))
    assert all(m == {"old", "recent"} for m in (await _index_members(client, store)).values())
    await store.append_turn(turn("new", "t1", user_name="ann", sys_code="x", created_at=1201.0))
    # "old" was idle for more than two TTLs (200 s): its keys expired long ago.
    assert all(m == {"recent", "new"} for m in (await _index_members(client, store)).values())


async def test_with_a_ttl_indexes_drop_conversations_idle_for_two_ttls(
    client: aioredis.Redis, prefix: str
) -> None:
    await _drop_idle_entries(client, RedisStore(client, prefix=prefix, ttl=100))


@pytest.mark.cluster
async def test_with_a_ttl_cluster_indexes_drop_conversations_idle_for_two_ttls() -> None:
    prefix = new_prefix()
    store = open_store(require_cluster() + "?ttl=100", prefix=prefix)
    try:
        await _drop_idle_entries(store.client, store)
    finally:
        await delete_prefix(store.client, prefix)
        await store.aclose()


async def test_without_ttl_nothing_expires(client: aioredis.Redis, prefix: str) -> None:
    await RedisStore(client, prefix=prefix).append_turn(turn("c", "t1"))
    for key in await keys_under(client, prefix):
        assert await client.ttl(key) == -1


async def test_expired_metadata_resets_the_conversation(client: aioredis.Redis, prefix: str) -> None:
    """Keys expire one by one; leftovers of an expired conversation never leak
    into reads, listings or the next conversation under the same uid."""
    store = RedisStore(client, prefix=prefix, ttl=1000)
    for i in range(3):
        await store.append_turn(turn("c", f"t{i}", user_name="ann"))
    await client.delete(ConversationKeys.of(prefix, "c").meta)  # as if it expired first
    assert await store.read_messages("c") == []
    assert await store.read_tail("c", 1000) == []
    assert await store.get_turn("c", "t0") is None
    assert await store.list_conversations(user_name="ann") == []
    assert await store.list_conversations() == []
    result = await store.append_turn(turn("c", "t0", "fresh"))
    assert not result.duplicate
    assert [m.seq for m in await store.read_messages("c")] == [1, 2]
    assert [m.content for m in await store.read_tail("c", 10_000)] == ["fresh", "a"]


async def test_listing_drops_entries_of_vanished_conversations(client: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(client, prefix=prefix)
    for uid in ["a", "b", "c", "d"]:
        await store.append_turn(turn(uid, "t", user_name="ann"))
    await client.delete(ConversationKeys.of(prefix, "c").meta, ConversationKeys.of(prefix, "b").meta)
    assert [c.conv_uid for c in await store.list_conversations(user_name="ann", limit=2)] == ["d", "a"]
    assert await client.zscore(f"{prefix}:idx:all", "c") is not None, "other indexes clean up when read"
    assert [c.conv_uid for c in await store.list_conversations()] == ["d", "a"]
    assert await client.zscore(f"{prefix}:idx:all", "c") is None


# -- round trips --------------------------------------------------------------


class Trips:
    """Counts what the client writes to its sockets: one send per command or pipeline."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = Connection.send_packed_command

        async def counting(conn: Connection, command: Any, check_health: bool = True) -> None:
            self.count += 1
            await original(conn, command, check_health)

        monkeypatch.setattr(Connection, "send_packed_command", counting)

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[Trips]:
    yield Trips(monkeypatch)


async def fill(store: RedisStore, conv_uid: str, turns: int, start: int = 0) -> None:
    import asyncio

    for lo in range(start, start + turns, 500):
        await asyncio.gather(
            *(
                store.append_turn(turn(conv_uid, f"t{i}", f"q{i:05d}", f"a{i:05d}"))
                for i in range(lo, min(lo + 500, start + turns))
            )
        )


@pytest.mark.redis
async def test_one_round_trip_per_append_and_per_read(trips: Trips) -> None:
    await require_redis()
    prefix = new_prefix()
    store = open_store(REDIS_URL, prefix=prefix)
    try:
        await store.append_turn(turn("c", "t0", user_name="ann", sys_code="x"))  # connects, loads scripts
        trips.take()
        await store.append_turn(turn("c", "t1", user_name="ann", sys_code="x"))
        assert trips.take() == 1
        await store.append_turn(turn("c", "t1"))  # a duplicate
        assert trips.take() == 1
        await store.read_tail("c", 100)
        await store.read_messages("c", start_seq=2, limit=2)
        await store.get_turn("c", "t1")
        await store.get_conversation("c")
        assert trips.take() == 4
        await store.list_conversations(user_name="ann")
        assert trips.take() == 2  # the index page, then the metadata in one pipeline
        await store.delete_conversation("c")
        assert trips.take() == 1
    finally:
        await delete_prefix(store.client, prefix)
        await store.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_read_tail_cost_does_not_follow_history_length(trips: Trips) -> None:
    await require_redis()
    prefix = new_prefix()
    store = open_store(REDIS_URL, prefix=prefix)
    try:
        await fill(store, "short", 50)  # 100 messages
        await fill(store, "long", 5000)  # 10,000 messages
        trips.take()
        short = await store.read_tail("short", 60)
        n_short = trips.take()
        long = await store.read_tail("long", 60)
        n_long = trips.take()
        assert n_short == n_long == 1
        assert len(short) == len(long) > 0
        assert long[-1].seq == 10_000
        assert [m.token_count for m in short] == [m.token_count for m in long]
        # A window wider than one HMGET chunk still comes back whole and in order.
        wide = await store.read_tail("long", 9000 * 10)
        assert [m.seq for m in wide] == list(range(10_001 - len(wide), 10_001))
        assert len(wide) == 9000
    finally:
        await delete_prefix(store.client, prefix)
        await store.aclose()


@pytest.mark.cluster
async def test_cluster_append_is_one_script_then_one_index_round(trips: Trips) -> None:
    url = require_cluster()
    prefix = new_prefix()
    store = open_store(url, prefix=prefix)
    assert isinstance(store.client, RedisCluster)
    try:
        await store.append_turn(turn("{odd} uid", "t0", user_name="ann", sys_code="x"))
        await store.read_tail("{odd} uid", 100)  # loads the scripts on the node
        trips.take()
        await store.append_turn(turn("{odd} uid", "t1", user_name="ann", sys_code="x"))
        sends = trips.take()
        # EVALSHA to the conversation's node, then ZADD GT to the 4 indexes,
        # pipelined: one send to each node holding one of them (at most 3).
        assert 2 <= sends <= 4
        await store.read_tail("{odd} uid", 100)
        assert trips.take() == 1
        slots = {
            await store.client.cluster_keyslot(k) for k in ConversationKeys.of(prefix, "{odd} uid").all()
        }
        assert len(slots) == 1
        assert [c.conv_uid for c in await store.list_conversations(user_name="ann", sys_code="x")] == [
            "{odd} uid"
        ]
    finally:
        await delete_prefix(store.client, prefix)
        await store.aclose()


# -- clients, URLs, errors ----------------------------------------------------


async def test_a_client_passed_in_stays_open(client: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(client, prefix=prefix)
    await store.append_turn(turn("c", "t"))
    await store.aclose()
    assert await client.ping()
    assert await RedisStore(client, prefix=prefix).get_conversation("c") is not None


async def test_a_client_from_a_url_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[object] = []

    async def spy(self: object, *args: object) -> None:
        closed.append(self)

    monkeypatch.setattr(aioredis.Redis, "aclose", spy)
    monkeypatch.setattr(RedisCluster, "aclose", spy)
    for url in ["redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1"]:
        store = open_store(url)
        await store.aclose()
        assert closed[-1] is store.client


@pytest.mark.parametrize(
    ("url", "cluster", "ssl"),
    [
        ("redis://127.0.0.1:1/0", False, False),
        ("rediss://127.0.0.1:1/0", False, True),
        ("redis+cluster://127.0.0.1:1", True, False),
        ("rediss+cluster://127.0.0.1:1", True, True),
        ("REDIS+CLUSTER://127.0.0.1:1", True, False),
    ],
)
async def test_from_url_takes_all_four_schemes_and_connects_lazily(
    url: str, cluster: bool, ssl: bool
) -> None:
    store = open_store(url + "?prefix=app:v2&ttl=60")  # nothing listens on port 1: nothing connected yet
    assert isinstance(store, RedisStore)
    assert (store.prefix, store.ttl, store.cluster) == ("app:v2", 60, cluster)
    if cluster:
        assert isinstance(store.client, RedisCluster)
        assert store.client.nodes_manager.connection_kwargs.get("ssl", False) is ssl or ssl
    else:
        assert type(store.client) is aioredis.Redis
        conn_class = store.client.connection_pool.connection_class
        assert ("SSL" in conn_class.__name__) is ssl
    await store.aclose()


async def test_keyword_arguments_win_over_the_query() -> None:
    store = open_store("redis://127.0.0.1:1/0?prefix=q&ttl=5", prefix="kw", ttl=7)
    assert (store.prefix, store.ttl) == ("kw", 7)
    await store.aclose()


async def test_unreachable_server_is_storage_unavailable() -> None:
    port = free_port()
    for url in [f"redis://127.0.0.1:{port}/0", f"redis+cluster://127.0.0.1:{port}"]:
        store = open_store(url, socket_connect_timeout=0.5)
        try:
            with pytest.raises(StorageUnavailableError) as caught:
                await store.append_turn(turn("c", "t"))
            assert caught.value.__cause__ is not None
            with pytest.raises(StorageUnavailableError):
                await store.list_conversations()
        finally:
            await store.aclose()


async def test_other_redis_errors_are_storage_errors(client: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(client, prefix=prefix)
    await client.set(ConversationKeys.of(prefix, "c").meta, "not a hash")
    with pytest.raises(StorageError) as caught:
        await store.get_conversation("c")
    assert not isinstance(caught.value, StorageUnavailableError)
    assert caught.value.__cause__ is not None
    with pytest.raises(StorageError):
        await store.append_turn(turn("c", "t"))


async def test_decode_responses_clients_work_too(prefix: str, client: aioredis.Redis) -> None:
    if isinstance(client, fakeredis.FakeAsyncRedis):
        decoding: aioredis.Redis = fakeredis.FakeAsyncRedis(
            server=client.connection_pool.connection_kwargs["server"], decode_responses=True
        )
    else:
        decoding = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        store = RedisStore(decoding, prefix=prefix)
        first = await store.append_turn(turn("c", "t1", "ünï", user_name="ann"))
        assert (await store.append_turn(turn("c", "t1"))).turn == first.turn
        assert [m.content for m in await store.read_tail("c", 100)] == ["ünï", "a"]
        assert [c.conv_uid for c in await store.list_conversations(user_name="ann")] == ["c"]
        assert await store.get_turn("c", "t1") == first.turn
    finally:
        await decoding.aclose()


async def test_timestamps_round_trip_exactly(client: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(client, prefix=prefix)
    t0, t1 = 1_700_000_000.123456789, 1_700_000_000.1234567891
    first = await store.append_turn(turn("c", "t1", created_at=t0))
    await store.append_turn(turn("c", "t2", created_at=t1))
    conv = await store.get_conversation("c")
    assert conv is not None
    assert (conv.created_at, conv.updated_at) == (t0, t1)
    assert (await store.read_messages("c"))[0].created_at == t0
    assert await store.get_turn("c", "t1") == first.turn
    await store.append_turn(turn("c", "t3", created_at=t0))  # an older clock never moves updated_at back
    conv = await store.get_conversation("c")
    assert conv is not None and conv.updated_at == t1


async def test_appended_messages_are_read_back_without_decoding_again(
    client: aioredis.Redis, prefix: str
) -> None:
    store = RedisStore(client, prefix=prefix)
    first = await store.append_turn(turn("c", "t1", 'ünï "quoted" \\ \U0001f600', user_name="ann"))
    second = await store.append_turn(turn("c", "t2", "q2", "a2"))
    appended = [*first.turn.messages, *second.turn.messages]
    tail = await store.read_tail("c", 10_000)
    assert all(a is b for a, b in zip(tail, appended, strict=True)), "the store kept what it wrote"
    assert await RedisStore(client, prefix=prefix, message_cache=0).read_tail("c", 10_000) == tail


def test_message_cache_reuses_decoded_messages_and_stays_bounded() -> None:
    from convcore_redis.codec import MessageCache

    raw = [
        b'{"seq":%d,"role":"user","content":"m%d","token_count":5,"starts_round":true,"turn_id":"t","created_at":1.5}'
        % (i, i)
        for i in range(1, 6)
    ]
    cache = MessageCache(capacity=4)
    first = cache.decode(raw[:3])
    again = cache.decode(raw[:3])
    assert [m.seq for m in first] == [1, 2, 3]
    assert all(a is b for a, b in zip(first, again, strict=True)), "decoded once, then reused"
    later = cache.decode(raw)
    assert [m.content for m in later] == [f"m{i}" for i in range(1, 6)]
    assert len(cache._entries) == 4, "the oldest entries go first"
    assert [m.seq for m in MessageCache(capacity=0).decode(raw)] == [1, 2, 3, 4, 5]


def test_message_cache_is_bounded_in_bytes_too() -> None:
    from convcore_redis.codec import MessageCache

    def raw(i: int, size: int) -> bytes:
        body = "x" * size
        return (
            b'{"seq":%d,"role":"user","content":"%s","token_count":5,"starts_round":true,"turn_id":"t","created_at":1.5}'
            % (i, body.encode())
        )

    cache = MessageCache(capacity=1000, max_bytes=4000)
    cache.decode([raw(i, 300) for i in range(1, 30)])
    assert cache._bytes <= 4000 and len(cache._entries) < 29
    assert cache._bytes == sum(len(k) for k in cache._entries)
    big = cache.decode([raw(99, 2000)])
    assert big[0].content == "x" * 2000 and raw(99, 2000) not in cache._entries, "too big to keep"
