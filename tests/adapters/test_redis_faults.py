"""A Redis server killed and restarted in the middle of concurrent turns.

The server is this test's own (a free loopback port, AOF with fsync on every
write, so what Redis acknowledged survives SIGKILL); the shared server on
6379 is never touched. Afterwards: every turn the caller was told succeeded
is stored, every other one raised a typed StorageError, and no half turn
exists anywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from convcore import ConvcoreError, Engine, StorageError, default_registry, open_store
from convcore.audit import audit_messages
from tests.adapters.redis_servers import own_redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TURNS = 200
CONV = "fault"


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    with anyio.move_on_after(timeout):
        while not condition():
            await anyio.sleep(0.005)
        return True
    return False


async def test_turns_across_a_redis_restart(tmp_path: Path) -> None:
    server = own_redis_server(tmp_path, ["--appendonly", "yes", "--appendfsync", "always"])
    store = open_store(server.url, prefix="cctest:fault", socket_connect_timeout=0.5, socket_timeout=2)
    engine = Engine(store, default_registry(latency=0.005), owned=True)
    succeeded: list[str] = []
    failed: dict[str, ConvcoreError] = {}
    restarted = asyncio.Event()
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        rid = f"r{i:03d}"
        if i >= TURNS // 2:
            await restarted.wait()  # the second half runs on the restarted server
        async with gate:
            try:
                await engine.chat({"messages": f"q {rid}", "conv_uid": CONV, "request_id": rid})
            except ConvcoreError as exc:  # anything else fails the test
                failed[rid] = exc
            else:
                succeeded.append(rid)

    async def chaos() -> None:
        try:
            assert await until(lambda: len(succeeded) >= 40, 20), "no progress before the kill"
            server.kill()
            assert await until(lambda: len(failed) >= 5, 20), "nothing failed while the server was down"
            await anyio.to_thread.run_sync(server.start)
        finally:
            restarted.set()

    try:
        with anyio.fail_after(90):
            await asyncio.gather(chaos(), *(one(i) for i in range(TURNS)))
        messages = await store.read_messages(CONV)
        conv = await store.get_conversation(CONV)
    finally:
        await engine.aclose()
        server.stop()

    assert len(succeeded) + len(failed) == TURNS
    assert failed and sum(rid >= f"r{TURNS // 2:03d}" for rid in succeeded) > 0
    assert all(isinstance(exc, StorageError) for exc in failed.values()), {
        type(e).__name__ for e in failed.values()
    }
    report = audit_messages(messages, expected_turns=succeeded, unique_inputs=True)
    assert report.ok, report.problems[:5]
    stored = {m.turn_id for m in messages}
    assert set(succeeded) <= stored <= set(succeeded) | set(failed)
    assert len(messages) == 2 * len(stored)
    assert conv is not None and conv.message_count == len(messages)
    assert conv.total_tokens == sum(m.token_count for m in messages)
