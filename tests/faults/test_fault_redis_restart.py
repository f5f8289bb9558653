"""Redis killed (SIGKILL) and restarted with its AOF in the middle of a load
sent through HTTP to a real ``convcore serve``: readiness says 503 while it
is down and 200 after, no acknowledged turn is lost, none is half-written
or duplicated, and no turn gets a 5xx once Redis answers again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from convcore_redis import RedisStore
from tests.adapters.redis_servers import own_redis_server
from tests.e2e.serve_process import ServeProcess
from tests.faults.ledger import Load, audit_case, wait_ready

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(180)]


async def test_redis_killed_and_restarted_with_aof_mid_load(tmp_path: Path) -> None:
    redis_server = own_redis_server(tmp_path, ["--appendonly", "yes", "--appendfsync", "always"])
    url = f"{redis_server.url}?prefix=faults&socket_connect_timeout=0.5&socket_timeout=2"
    service = ServeProcess(url, tmp_path, ("--ready-timeout", "1")).start()
    store = RedisStore.from_url(url)
    try:
        load = Load("redis", [service.base], ["r-a", "r-b", "r-c", "r-d"], turns=240, concurrency=16)
        load.progress_at = 60
        running = asyncio.ensure_future(load.run())
        await asyncio.wait_for(load.progress.wait(), 60)
        redis_server.kill()
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(timeout=5) as client:
            down = await client.get(f"{service.base}/readyz")
        assert down.status_code == 503, down.text
        assert down.json()["checks"]["store"]["ok"] is False
        await asyncio.sleep(0.5)
        redis_server.start()
        load.recovered_at = await wait_ready(service.base)
        await running
        row = await audit_case(
            "Redis SIGKILL + AOF restart", store, load.acknowledged, load.five_xx_after_recovery(),
            note=f"{sum(1 for _, s in load.attempts if s >= 500 or s == 0)} refused while down",
        )  # fmt: skip
        assert row.acknowledged == load.turns, f"only {row.acknowledged}/{load.turns} acknowledged"
        assert row.ok, row
        assert row.stored == row.acknowledged
    finally:
        await store.aclose()
        service.stop()
        redis_server.stop()


async def test_readiness_recovers_within_seconds_of_redis_answering(tmp_path: Path) -> None:
    redis_server = own_redis_server(tmp_path, ["--appendonly", "yes"])
    url = f"{redis_server.url}?prefix=ready&socket_connect_timeout=0.5&socket_timeout=2"
    service = ServeProcess(url, tmp_path, ("--ready-timeout", "1")).start()
    try:
        redis_server.kill()
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{service.base}/readyz")).status_code == 503
            redis_server.start()
            back = time.monotonic()
            await wait_ready(service.base, timeout=10)
            assert time.monotonic() - back < 5.0
            r = await client.post(
                f"{service.base}/api/v2/chat/completions", json={"messages": "hi"}, headers=service.headers
            )
            assert r.status_code == 200
    finally:
        service.stop()
        redis_server.stop()
