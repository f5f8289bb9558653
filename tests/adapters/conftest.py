"""Fixtures the adapter tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
import redis.asyncio as aioredis

from tests.stores.redis import REDIS_URL, require_redis


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    """A Redis client the test owns: fakeredis, or the real server (each test
    keeps its keys under its own prefix)."""
    if request.param == "fakeredis":
        c: aioredis.Redis = fakeredis.FakeAsyncRedis()
    else:
        await require_redis()
        c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()
