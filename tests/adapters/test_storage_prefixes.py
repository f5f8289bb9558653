"""The URL's ``?table_prefix=`` / ``?prefix=`` places the records exactly
where it places the conversations: the same tables' prefix, the same keys'."""

from __future__ import annotations

import uuid
from pathlib import Path

import fakeredis
import pytest
from sqlalchemy import inspect

from convcore import open_store
from tests.helpers import turn
from tests.stores.redis import REDIS_URL, delete_prefix, require_redis, with_prefix

pytestmark = pytest.mark.anyio


async def test_sql_records_live_in_the_prefixed_tables(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}?table_prefix=mine_")
    try:
        await store.append_turn(turn("c", "t1"))
        await store.records.put("app", "a", {"v": 1})
        async with store.engine.connect() as conn:  # type: ignore[attr-defined]
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await store.aclose()
    assert tables == {
        f"mine_{t}" for t in ("conversations", "messages", "turns", "schema_version", "records")
    }


@pytest.mark.parametrize(
    "real", [False, pytest.param(True, marks=pytest.mark.redis)], ids=["fakeredis", "redis"]
)
async def test_redis_records_live_under_the_prefix(real: bool) -> None:
    prefix = f"cctest:{uuid.uuid4().hex}"
    if real:
        await require_redis()
        store = open_store(with_prefix(REDIS_URL, prefix))
    else:
        store = open_store(with_prefix("redis://", prefix), client=fakeredis.FakeAsyncRedis())
    client = store.client  # type: ignore[attr-defined]
    try:
        await store.append_turn(turn("c", "t1", user_name="ann"))
        await store.records.put("app", "a", {"v": 1, "user_name": "ann", "sys_code": "s"})
        mine = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        assert any(b":rec:" in (k if isinstance(k, bytes) else k.encode()) for k in mine)
        if not real:  # a private server: nothing outside the prefix at all
            everything = [k async for k in client.scan_iter(count=1000)]
            assert sorted(everything) == sorted(mine)
    finally:
        await delete_prefix(client, prefix)
        await store.aclose()
