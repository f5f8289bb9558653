"""Pooled connections after a Redis restart: the server is back, so every
turn succeeds, although every connection the pool held before is dead."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from convcore import Engine, default_registry
from convcore.audit import audit_messages
from convcore_redis import RedisStore
from tests.adapters.redis_servers import own_redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

WIDTH = 40


async def test_every_turn_succeeds_once_a_restarted_redis_answers(tmp_path: Path) -> None:
    server = own_redis_server(tmp_path, ["--appendonly", "yes", "--appendfsync", "always"])
    store = RedisStore.from_url(server.url, prefix="cctest:pool", socket_connect_timeout=1, socket_timeout=2)
    engine = Engine(store, default_registry(), owned=True)
    try:

        async def wave(tag: str) -> list[BaseException | object]:
            return await asyncio.gather(
                *(
                    engine.chat(
                        {"messages": f"{tag}-{i}", "conv_uid": f"c{i % 4}", "request_id": f"{tag}-{i}"}
                    )
                    for i in range(WIDTH)
                ),
                return_exceptions=True,
            )

        before = await wave("before")  # fills the pool with WIDTH-ish open connections
        assert not [r for r in before if isinstance(r, BaseException)]
        server.kill()
        server.start()  # answers PING now; the pool's connections are all dead
        after = await wave("after")
        failures = [repr(r) for r in after if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)}/{WIDTH} turns failed after the restart: {failures[:3]}"
        for c in range(4):
            msgs = await store.read_messages(f"c{c}")
            ids = [f"{t}-{i}" for t in ("before", "after") for i in range(WIDTH) if i % 4 == c]
            report = audit_messages(msgs, expected_turns=ids, unique_inputs=True)
            assert report.ok, report.problems[:5]
    finally:
        await engine.aclose()
        server.stop()
