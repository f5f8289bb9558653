"""One contract suite for every RecordStore: memory, SQLite, PostgreSQL,
MariaDB, fakeredis and the real Redis server.

Each test gets a fresh namespace (``ccs_<hex>_`` tables, ``ccstest:<hex>``
keys) that is dropped afterwards.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import fakeredis
import pytest
import redis.asyncio as aioredis

from convcore import ConflictError, MemoryRecordStore, RecordStore
from convcore_redis.records import RedisRecordStore
from convcore_sql.records import SQLRecordStore
from tests.stores import unavailable
from tests.stores.sql import MARIADB_URL, PG_URL, reachable

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("CONVCORE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@asynccontextmanager
async def _memory() -> AsyncIterator[tuple[Callable[[], RecordStore], Callable[[], Awaitable[None]]]]:
    store = MemoryRecordStore()

    async def cleanup() -> None:
        return None

    yield (lambda: store), cleanup


def _sql(url: str, name: str) -> Callable[[], object]:
    @asynccontextmanager
    async def opener() -> AsyncIterator[tuple[Callable[[], RecordStore], Callable[[], Awaitable[None]]]]:
        if not reachable(url):
            unavailable(f"{name} is not reachable at {url}")
        prefix = f"ccs_{uuid.uuid4().hex[:10]}_"

        def make() -> RecordStore:
            return SQLRecordStore.from_url(url, table_prefix=prefix, pool_size=3, max_overflow=3)

        async def cleanup() -> None:
            store = SQLRecordStore.from_url(url, table_prefix=prefix)
            try:
                await store.drop_tables()
            finally:
                await store.aclose()

        yield make, cleanup

    return opener


@asynccontextmanager
async def _sqlite() -> AsyncIterator[tuple[Callable[[], RecordStore], Callable[[], Awaitable[None]]]]:
    with tempfile.TemporaryDirectory() as tmp:
        target = f"sqlite:///{Path(tmp) / 'records.db'}"

        def make() -> RecordStore:
            return SQLRecordStore.from_url(target, table_prefix="ccs_")

        async def cleanup() -> None:
            return None

        yield make, cleanup


def _redis(real: bool, decode: bool = True) -> Callable[[], object]:
    @asynccontextmanager
    async def opener() -> AsyncIterator[tuple[Callable[[], RecordStore], Callable[[], Awaitable[None]]]]:
        prefix = f"ccstest:{uuid.uuid4().hex}"
        server = fakeredis.FakeServer()
        if real:
            probe = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
            try:
                await probe.ping()
            except (aioredis.RedisError, OSError) as exc:
                unavailable(f"no Redis server at {REDIS_URL}: {exc}")
            finally:
                await probe.aclose()

        def client() -> aioredis.Redis:
            if real:
                return aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
            return fakeredis.FakeAsyncRedis(server=server, decode_responses=decode)

        def make() -> RecordStore:
            return RedisRecordStore(client(), prefix=prefix, owned=True)

        async def cleanup() -> None:
            c = client()
            try:
                keys = [k async for k in c.scan_iter(match=f"{prefix}:*", count=1000)]
                if keys:
                    await c.delete(*keys)
            finally:
                await c.aclose()

        yield make, cleanup

    return opener


OPENERS = [
    pytest.param(_memory, id="memory"),
    pytest.param(_sqlite, id="sqlite"),
    pytest.param(_sql(PG_URL, "PostgreSQL"), id="postgresql", marks=pytest.mark.postgres),
    pytest.param(_sql(MARIADB_URL, "MariaDB"), id="mariadb", marks=pytest.mark.mysql),
    pytest.param(_redis(False), id="fakeredis"),
    pytest.param(_redis(False, decode=False), id="fakeredis-bytes"),
    pytest.param(_redis(True), id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=OPENERS)
async def records_factory(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], RecordStore]]:
    async with request.param() as (make, cleanup):
        try:
            yield make
        finally:
            await cleanup()


@pytest.fixture
async def records(records_factory: Callable[[], RecordStore]) -> AsyncIterator[RecordStore]:
    store = records_factory()
    try:
        yield store
    finally:
        await store.aclose()


async def test_satisfies_the_protocol(records: RecordStore) -> None:
    assert isinstance(records, RecordStore)


async def test_put_get_roundtrip_keeps_json_types(records: RecordStore) -> None:
    value = {"s": "héllo 世界", "i": 7, "f": 1.5, "b": True, "n": None, "l": [1, "x"], "d": {"k": [{}]}}
    await records.put("app", "a1", value)
    assert await records.get("app", "a1") == value
    assert await records.get("app", "missing") is None
    assert await records.get("other-kind", "a1") is None


async def test_put_replaces(records: RecordStore) -> None:
    await records.put("app", "a", {"v": 1})
    await records.put("app", "a", {"v": 2})
    assert await records.get("app", "a") == {"v": 2}
    assert await records.list("app") == [{"v": 2}]


async def test_create_only_conflicts_and_changes_nothing(records: RecordStore) -> None:
    await records.put("app", "a", {"v": 1}, create_only=True)
    with pytest.raises(ConflictError):
        await records.put("app", "a", {"v": 2}, create_only=True)
    assert await records.get("app", "a") == {"v": 1}
    await records.put("app2", "a", {"v": 3}, create_only=True)  # another kind: no conflict


async def test_list_is_ordered_by_key_and_paged(records: RecordStore) -> None:
    keys = ["b", "a", "c10", "c2", "Z", "é", "000000000010", "000000000002"]
    for k in keys:
        await records.put("k", k, {"key": k})
    listed = [r["key"] for r in await records.list("k", limit=100)]
    assert listed == sorted(keys)
    assert [r["key"] for r in await records.list("k", limit=3, offset=2)] == sorted(keys)[2:5]
    assert await records.list("k", limit=5, offset=100) == []
    assert await records.list("k", limit=0) == []
    assert await records.list("empty-kind") == []


async def test_delete_returns_the_record_once(records: RecordStore) -> None:
    await records.put("ds", "1", {"id": 1})
    assert await records.delete("ds", "1") == {"id": 1}
    assert await records.delete("ds", "1") is None
    assert await records.get("ds", "1") is None
    assert await records.list("ds") == []
    assert await records.delete("ds", "never") is None
    await records.put("ds", "1", {"id": 1}, create_only=True)  # the key is free again


async def test_odd_keys_and_kinds(records: RecordStore) -> None:
    long_key = "k" * 2000 + "{}:*?[]"
    kind = "knowledge_chunk:space {x} ünï"
    await records.put(kind, long_key, {"ok": 1})
    await records.put(kind, "", {"empty": True})
    assert await records.get(kind, long_key) == {"ok": 1}
    assert await records.get(kind, "") == {"empty": True}
    assert len(await records.list(kind)) == 2
    assert await records.delete(kind, long_key) == {"ok": 1}


async def test_racing_creates_exactly_one_wins(records_factory: Callable[[], RecordStore]) -> None:
    stores = [records_factory() for _ in range(4)]
    wins: list[int] = []
    conflicts: list[int] = []

    async def create(i: int) -> None:
        try:
            await stores[i % len(stores)].put("race", "the-one", {"by": i}, create_only=True)
            wins.append(i)
        except ConflictError:
            conflicts.append(i)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(create, i)
        assert len(wins) == 1 and len(conflicts) == 7
        assert await stores[0].get("race", "the-one") == {"by": wins[0]}
    finally:
        for s in stores:
            await s.aclose()


async def test_racing_deletes_return_the_record_once(records_factory: Callable[[], RecordStore]) -> None:
    stores = [records_factory() for _ in range(4)]
    got: list[object] = []
    try:
        await stores[0].put("race", "gone", {"v": 1})

        async def remove(i: int) -> None:
            got.append(await stores[i % len(stores)].delete("race", "gone"))

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(remove, i)
        assert [g for g in got if g is not None] == [{"v": 1}]
    finally:
        for s in stores:
            await s.aclose()


async def test_values_are_copies(records: RecordStore) -> None:
    value = {"l": [1]}
    await records.put("c", "k", value)
    value["l"].append(2)
    got = await records.get("c", "k")
    assert got == {"l": [1]}
    assert got is not None
    got["l"].append(3)
    assert await records.get("c", "k") == {"l": [1]}
