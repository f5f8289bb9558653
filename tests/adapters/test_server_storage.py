"""``convcore serve`` keeps conversations and the chat modes' records in one
storage: one connection pool per store URL, one prefix for both.

The service runs in this process (``serve`` with uvicorn's loop replaced by
requests through the ASGI app), while every connection pool created is
counted: SQLAlchemy pools for SQL URLs, redis-py connection pools for Redis,
cluster clients for a Redis Cluster (whose nodes hold their own connections).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool
from sqlalchemy.pool import Pool

from convcore import open_store
from convcore_server.cli import parse_args, serve
from tests.stores import StoreFactory, all_factory_params

pytestmark = pytest.mark.anyio

# Every backend a URL names (fakeredis has none).
SERVED = [p for p in all_factory_params() if p.id != "fakeredis"]  # type: ignore[attr-defined]


@pytest.fixture(params=SERVED)
async def served_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as factory:
        try:
            yield factory
        finally:
            await factory.cleanup()


@pytest.fixture
def uvicorn_logging() -> Iterator[None]:
    """uvicorn.Config installs handlers on pytest's captured stderr: put the
    loggers back, so servers other tests run in threads log where they did."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in names)]  # serve configures root too
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def _pools() -> dict[str, set[int]]:
    """The connection pools and cluster clients alive now, by kind."""
    kinds = {"sql": Pool, "redis": ConnectionPool, "clusters": RedisCluster}
    alive: dict[str, set[int]] = {kind: set() for kind in kinds}
    for obj in gc.get_objects():
        for kind, cls in kinds.items():
            if isinstance(obj, cls):
                alive[kind].add(id(obj))
    return alive


async def _exercise(app: Any) -> dict[str, Any]:
    """One record write and one chat_app turn through the HTTP API."""
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://convcore.test") as c:
        created = await c.post("/api/v2/serve/apps", json={"app_code": "helper", "app_name": "Helper"})
        assert created.status_code == 200, created.text
        chat = await c.post(
            "/api/v2/chat/completions",
            json={"messages": "hello", "chat_mode": "chat_app", "chat_param": "helper", "user_name": "ann"},
        )
        assert chat.status_code == 200, chat.text
        return dict(chat.json())


async def test_serve_opens_one_pool_per_store_url(
    served_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch, uvicorn_logging: None
) -> None:
    assert served_factory.url is not None
    seen: dict[str, Any] = {}
    before = _pools()

    async def requests_instead_of_a_socket(server: uvicorn.Server, sockets: Any = None) -> None:
        seen["reply"] = await _exercise(server.config.app)
        # serve froze what starting made, its pools among them: back where gc.get_objects() lists them.
        gc.unfreeze()
        # Pools opened by the service and alive while it serves.
        seen["pools"] = {kind: len(ids - before[kind]) for kind, ids in _pools().items()}
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "serve", requests_instead_of_a_socket)
    assert (
        await serve(parse_args(["--store", served_factory.url, "--no-auth", "--log-level", "warning"])) == 0
    )
    monkeypatch.undo()

    pools = seen["pools"]
    if served_factory.name in {"sqlite", "postgresql", "mariadb"}:
        assert pools == {"sql": 1, "redis": 0, "clusters": 0}
    elif served_factory.name == "redis":
        assert pools == {"sql": 0, "redis": 1, "clusters": 0}
    elif served_factory.name == "redis-cluster":
        # One cluster client (its nodes keep their connections themselves), not one per facet.
        assert pools == {"sql": 0, "redis": 0, "clusters": 1}
    else:
        assert pools == {"sql": 0, "redis": 0, "clusters": 0}  # memory

    # Both facets landed in the URL's namespace: a storage opened on the same
    # URL sees the app and the conversation.
    if served_factory.name != "memory":
        store = open_store(served_factory.url)
        try:
            app = await store.records.get("app", "helper")
            assert app is not None and app["app_name"] == "Helper"
            conv = await store.get_conversation(seen["reply"]["conv_uid"])
            assert conv is not None and conv.chat_param == "helper"
        finally:
            await store.aclose()
