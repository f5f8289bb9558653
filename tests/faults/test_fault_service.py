"""The service itself failing: killed (SIGKILL) in the middle of streams, and
two service processes sharing one store with many writers on one conv_uid
split across them, with and without ``serialize``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from convcore_redis import RedisStore
from convcore_sql import SQLStore
from tests.adapters.redis_servers import own_redis_server
from tests.e2e.serve_process import KEY, ServeProcess
from tests.faults.ledger import Load, audit_case, wait_ready

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(180)]

STREAMS = 12
WORDS = " ".join(f"w{i}" for i in range(30))  # a reply of ~40 tokens: about a second at 40 tokens/s


async def test_service_killed_mid_stream(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    pace = ("--local-tokens-per-second", "40")
    service = ServeProcess(url, tmp_path, pace).start()
    acknowledged: dict[str, str] = {}
    bodies: dict[str, dict[str, object]] = {}
    started = asyncio.Event()
    begun: set[str] = set()

    async def stream(i: int, client: httpx.AsyncClient) -> None:
        rid = f"kill-{i:03d}"
        body: dict[str, object] = {
            "messages": f"q {rid} {WORDS}", "conv_uid": f"k-{i % 3}", "request_id": rid, "stream": True
        }  # fmt: skip
        bodies[rid] = body
        try:
            async with client.stream("POST", f"{service.base}/api/v2/chat/completions", json=body) as r:
                finished = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"][0]["delta"].get("content"):
                        begun.add(rid)
                        if len(begun) == STREAMS:
                            started.set()
                    finished = finished or (
                        chunk["choices"][0].get("finish_reason") == "stop" and "error" not in chunk
                    )
                if finished:
                    acknowledged[rid] = str(body["conv_uid"])
        except httpx.TransportError:
            pass  # the service died under it: not acknowledged

    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
            tasks = [asyncio.ensure_future(stream(i, client)) for i in range(STREAMS)]
            await asyncio.wait_for(started.wait(), 30)
            service.kill()
            await asyncio.gather(*tasks)
        cut = STREAMS - len(acknowledged)
        assert cut > 0, "every stream finished before the kill; the case did not test a kill mid-stream"

        service = ServeProcess(url, tmp_path, pace, port=service.port).start()
        recovered = await wait_ready(service.base)
        # Clients retry what was not acknowledged, with the same request ids.
        retry = Load("kill", [service.base], ["k-0", "k-1", "k-2"], turns=0, concurrency=STREAMS)
        retry.recovered_at = recovered
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:

            async def again(rid: str) -> None:
                body = {**bodies[rid], "stream": False}
                while True:
                    t = time.monotonic()
                    r = await client.post(f"{service.base}/api/v2/chat/completions", json=body)
                    retry.attempts.append((t, r.status_code))
                    if r.status_code == 200:
                        acknowledged[rid] = str(body["conv_uid"])
                        return
                    assert time.monotonic() - recovered < 30, r.text
                    await asyncio.sleep(0.1)

            await asyncio.gather(*(again(rid) for rid in bodies if rid not in acknowledged))
        store = SQLStore.from_url(url)
        try:
            row = await audit_case(
                "service SIGKILL mid-stream", store, acknowledged, retry.five_xx_after_recovery(),
                note=f"{cut} of {STREAMS} streams cut, then retried",
            )  # fmt: skip
        finally:
            await store.aclose()
        assert row.acknowledged == STREAMS and row.ok, row
    finally:
        service.stop()


@pytest.mark.parametrize("serialize", [False, True], ids=["concurrent", "serialize"])
async def test_two_services_sharing_one_store_with_writers_on_one_conversation(
    tmp_path: Path, serialize: bool
) -> None:
    redis_server = own_redis_server(tmp_path, ["--appendonly", "no"])
    url = f"{redis_server.url}?prefix=two"
    first = ServeProcess(url, tmp_path).start()
    second = ServeProcess(url, tmp_path).start()
    store = RedisStore.from_url(url)
    try:
        case = "w3-serialize" if serialize else "w3-concurrent"
        load = Load(case, [first.base, second.base], ["w3"], turns=48, concurrency=24, serialize=serialize)
        await load.run()
        conflicts = sum(1 for _, s in load.attempts if s == 409)
        row = await audit_case(
            f"two services, W3 {'serialized' if serialize else 'concurrent'}", store, load.acknowledged,
            load.five_xx_after_recovery(), note=f"{conflicts} answers of 409 retried by clients",
        )  # fmt: skip
        assert row.acknowledged == load.turns and row.ok, row
        if serialize:
            # Each reply saw every turn stored before it: the local model says how many.
            replies = [m.content for m in await store.read_messages("w3") if m.role == "assistant"]
            unserialized = [
                i for i, text in enumerate(replies)
                if (f"(earlier user messages: {i};" not in text if i else "(earlier" in text)
            ]  # fmt: skip
            assert not unserialized, f"replies {unserialized[:5]} did not see every earlier turn"
    finally:
        await store.aclose()
        first.stop()
        second.stop()
        redis_server.stop()
