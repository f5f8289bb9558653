"""Turns raced from several OS processes, and a PostgreSQL backend killed
under a run of concurrent turns."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from sqlalchemy import text

from convcore import ConvcoreError, Engine, StorageError, default_registry, open_store
from convcore.audit import audit_messages
from tests.helpers import assert_race_kept_every_turn
from tests.stores import StoreFactory, unavailable
from tests.stores.sql import FACTORY_PARAMS, PG_URL, POOL, new_prefix, reachable, with_table_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PROCESSES = 4
TURNS = 50
CONV = "shared {conv}: ünïcødé"


def _chat(conv_uid: str, turn_id: str) -> dict[str, Any]:
    return {
        "model": "convcore-local",
        "messages": f"q-{turn_id}",
        "conv_uid": conv_uid,
        "request_id": turn_id,
    }


def _process_worker(url: str, proc: int, start: Any, results: Any) -> None:
    """One OS process: its own store and engine, 50 turns at once."""

    async def run() -> list[str]:
        store = open_store(url, **({} if url.startswith("sqlite") else POOL))  # the URL names the prefix
        async with Engine(store, default_registry(), owned=True) as engine:
            await store.get_conversation(CONV)  # schema and connections ready before the start line
            start.wait(timeout=60)
            ids = [f"p{proc}-t{i}" for i in range(TURNS)]
            await asyncio.gather(*(engine.chat(_chat(CONV, t)) for t in ids))
            return ids

    try:
        results.put(("ok", asyncio.run(run())))
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc)))


@pytest.fixture(params=FACTORY_PARAMS)
async def sql_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as factory:
        try:
            yield factory
        finally:
            await factory.cleanup()


async def test_four_processes_race_turns_at_one_conversation(sql_factory: StoreFactory) -> None:
    assert sql_factory.url is not None
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(sql_factory.url, p, start, results))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=180) for _ in procs]
    except queue.Empty:
        pytest.fail("a worker process did not report within 180 s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [detail for status, detail in outcomes if status != "ok"]
    assert not errors, errors
    expected = [t for _, ids in outcomes for t in ids]
    assert len(expected) == PROCESSES * TURNS

    reader = sql_factory.make()
    try:
        await assert_race_kept_every_turn(reader, CONV, expected)
    finally:
        await reader.aclose()


@pytest.mark.postgres
@pytest.mark.parametrize("retries", [8, 1], ids=["retried", "not-retried"])
async def test_killed_postgres_backends_lose_no_acknowledged_turn(retries: int) -> None:
    """With retries the kills are absorbed; without, the turns they hit fail
    with a typed error. Either way no acknowledged turn is lost and no turn
    is stored in part."""
    if not reachable(PG_URL):
        unavailable(f"PostgreSQL is not reachable at {PG_URL}")
    app_name = f"cct_fault_{uuid.uuid4().hex[:12]}"
    prefix = new_prefix()
    store = open_store(
        with_table_prefix(PG_URL, prefix),
        retries=retries,
        connect_args={"server_settings": {"application_name": app_name}},
        **POOL,
    )
    admin = open_store(with_table_prefix(PG_URL, prefix), pool_size=1, max_overflow=0)
    conv_uid = "fault"
    workers, per_worker = 8, 15
    done: list[str] = []
    failed: list[BaseException] = []
    killed: list[int] = []

    async def worker(w: int) -> None:
        for i in range(per_worker):
            turn_id = f"w{w}-t{i}"
            try:
                await engine.chat(_chat(conv_uid, turn_id))
            except ConvcoreError as exc:
                failed.append(exc)
            else:
                done.append(turn_id)

    async def killer() -> None:
        for threshold in (10, 40, 70, 100):
            while len(done) + len(failed) < threshold:
                await asyncio.sleep(0.002)
            async with admin.engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :app AND pid <> pg_backend_pid()"
                    ),
                    {"app": app_name},
                )
                killed.extend(1 for r in rows if r[0])
                await conn.commit()

    engine = Engine(store, default_registry(), owned=True)
    try:
        await store.get_conversation(conv_uid)  # creates the tables
        with anyio_fail_after(120):
            await asyncio.gather(killer(), *(worker(w) for w in range(workers)))
        messages = await admin.read_messages(conv_uid)
    finally:
        await engine.aclose()
        await admin.drop_tables()
        await admin.aclose()

    assert killed, "no backend was killed: the test did not test anything"
    assert len(done) + len(failed) == workers * per_worker
    assert all(isinstance(e, StorageError) for e in failed), failed[:3]
    report = audit_messages(messages, expected_turns=done, unique_inputs=True)
    assert report.ok, report.problems[:5]
    stored = {m.turn_id for m in messages}
    assert set(done) <= stored
    assert len(messages) == 2 * len(stored), "no half turn"


def anyio_fail_after(seconds: float) -> Any:
    import anyio

    return anyio.fail_after(seconds)
