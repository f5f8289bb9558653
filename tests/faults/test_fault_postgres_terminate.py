"""PostgreSQL backends terminated again and again in the middle of a load sent
through HTTP to a real ``convcore serve``.

Only this case's backends are terminated: the service uses a database of
its own (``convcore_faults_<pid>``), and the terminations are filtered by it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from convcore_sql import SQLStore
from tests.e2e.serve_process import ServeProcess
from tests.faults.ledger import Load, audit_case, wait_ready
from tests.stores import unavailable
from tests.stores.sql import PG_URL, reachable

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(180)]

ROUNDS = 12


@pytest.fixture
async def own_database() -> AsyncIterator[tuple[str, str]]:
    """A database only this test uses, dropped afterwards: (name, URL)."""
    import asyncpg

    if not reachable(PG_URL):
        unavailable(f"PostgreSQL is not reachable at {PG_URL}")
    name = f"convcore_faults_{os.getpid()}"
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield name, PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def terminate_backends(database: str) -> int:
    """Terminate every backend connected to ``database`` (never another one's)."""
    import asyncpg

    admin = await asyncpg.connect(PG_URL)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return sum(1 for r in rows if r[0])
    finally:
        await admin.close()


async def test_postgres_backends_terminated_mid_load(own_database: tuple[str, str], tmp_path: Path) -> None:
    name, url = own_database
    service = ServeProcess(url, tmp_path, ("--ready-timeout", "1")).start()
    store = SQLStore.from_url(url)
    try:
        load = Load("pg", [service.base], ["p-a", "p-b", "p-c", "p-d"], turns=240, concurrency=16)
        load.progress_at = 40
        running = asyncio.ensure_future(load.run())
        await asyncio.wait_for(load.progress.wait(), 60)
        terminated = 0
        for _ in range(ROUNDS):
            terminated += await terminate_backends(name)
            await asyncio.sleep(0.15)
        load.recovered_at = await wait_ready(service.base)
        await running
        row = await audit_case(
            "PostgreSQL backends terminated", store, load.acknowledged, load.five_xx_after_recovery(),
            note=f"{terminated} backends terminated in {ROUNDS} rounds",
        )  # fmt: skip
        assert terminated > 0
        assert row.acknowledged == load.turns, f"only {row.acknowledged}/{load.turns} acknowledged"
        assert row.ok, row
    finally:
        await store.aclose()
        service.stop()
