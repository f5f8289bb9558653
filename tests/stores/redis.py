"""Redis store factories: fakeredis, the real server on 127.0.0.1:6379, and a
3-master Redis Cluster on loopback that the test session starts itself.

Every factory works under a fresh ``cctest:<uuid>`` key prefix; cleanup
deletes that prefix's keys (SCAN with MATCH on the prefix, tests only).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from convcore import Storage, open_store
from tests.adapters.redis_servers import ServerUnavailable, shared_cluster
from tests.stores import StoreFactory, unavailable

REDIS_URL = os.environ.get("CONVCORE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def new_prefix() -> str:
    return f"cctest:{uuid.uuid4().hex}"


def with_prefix(url: str, prefix: str) -> str:
    """``url`` carrying the prefix, so ``open_store(url)`` lands in the namespace."""
    return f"{url}{'&' if '?' in url else '?'}prefix={quote(prefix, safe=':')}"


async def delete_prefix(client: aioredis.Redis | RedisCluster, prefix: str) -> None:
    """Delete every key under ``prefix`` (on every master of a cluster)."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.delete(key)
            await pipe.execute()


async def require_redis(url: str = REDIS_URL) -> None:
    """Skip (fail in CI) unless the server at ``url`` answers PING."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        await client.ping()
    except (aioredis.RedisError, OSError) as exc:
        unavailable(f"no Redis server at {url}: {exc}")
    finally:
        await client.aclose()


def require_cluster() -> str:
    """The session cluster's URL (started on first use); skip/fail if it cannot start."""
    try:
        return shared_cluster().url
    except ServerUnavailable as exc:
        unavailable(f"cannot start a Redis Cluster on loopback: {exc}")
        raise  # unreachable: unavailable() skips or fails


def fakeredis_factory(decode: bool = False) -> object:
    @asynccontextmanager
    async def factory() -> AsyncIterator[StoreFactory]:
        server = fakeredis.FakeServer()
        prefix, other = new_prefix(), new_prefix()

        def opener(namespace: str) -> Storage:
            client = fakeredis.FakeAsyncRedis(server=server, decode_responses=decode)
            return open_store(with_prefix("redis://", namespace), client=client)

        async def cleanup() -> None:
            return None  # the FakeServer goes with the factory

        yield StoreFactory(
            name="fakeredis",
            make=lambda: opener(prefix),
            make_other=lambda: opener(other),
            cleanup=cleanup,
            extra={"prefix": prefix},
        )

    return factory


@asynccontextmanager
async def server_factory(name: str, url: str) -> AsyncIterator[StoreFactory]:
    prefix, other = new_prefix(), new_prefix()
    store_url = with_prefix(url, prefix)

    async def cleanup() -> None:
        store = open_store(url)
        try:
            for namespace in (prefix, other):
                await delete_prefix(store.client, namespace)  # type: ignore[attr-defined]
        finally:
            await store.aclose()

    yield StoreFactory(
        name=name,
        make=lambda: open_store(store_url),
        make_other=lambda: open_store(with_prefix(url, other)),
        cleanup=cleanup,
        cross_process=True,
        url=store_url,
        extra={"prefix": prefix, "server_url": url},
    )


@asynccontextmanager
async def redis_factory() -> AsyncIterator[StoreFactory]:
    await require_redis()
    async with server_factory("redis", REDIS_URL) as factory:
        yield factory


@asynccontextmanager
async def cluster_factory() -> AsyncIterator[StoreFactory]:
    async with server_factory("redis-cluster", require_cluster()) as factory:
        yield factory


FACTORY_PARAMS = [
    pytest.param(fakeredis_factory(), id="fakeredis"),
    pytest.param(redis_factory, id="redis", marks=pytest.mark.redis),
    pytest.param(cluster_factory, id="redis-cluster", marks=pytest.mark.cluster),
]
