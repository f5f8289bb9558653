"""Upgrading SQL tables to records with owners (schema 2 -> 3) keeps every
row and leaves the old ones ownerless, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from sqlalchemy import Column, Float, MetaData, String, Table, Text, inspect, select, update

from convcore import Storage
from convcore_sql import SCHEMA_VERSION
from convcore_sql.tables import digest
from tests.helpers import turn
from tests.stores import StoreFactory
from tests.stores.sql import FACTORY_PARAMS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=FACTORY_PARAMS)
async def sql_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as factory:
        try:
            yield factory
        finally:
            await factory.cleanup()


def _old_records(name: str) -> Table:
    """The records table as it was before owners: no user_name / sys_code."""
    return Table(
        name,
        MetaData(),
        Column("kind", String(255), primary_key=True),
        Column("key_digest", String(64), primary_key=True),
        Column("key", Text, nullable=False),
        Column("value", Text, nullable=False),
        Column("updated_at", Float, nullable=False),
    )


OLD_ROWS = [
    ("flow", "1", {"id": 1, "name": "mine", "user_name": "ann", "sys_code": "s"}),  # claimed, never checked
    ("app", "a", {"app_code": "a"}),
    ("datasource", "7", {"id": 7, "db_pwd": "kept as it was"}),
]


async def _put_old_table(store: Storage) -> None:
    """Replace the store's records table by an old-layout one holding OLD_ROWS."""
    engine = store.engine  # type: ignore[attr-defined]
    name = store.tables.records.name  # type: ignore[attr-defined]
    old = _old_records(name)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: store.tables.records.drop(c, checkfirst=True))  # type: ignore[attr-defined]
        await conn.run_sync(lambda c: old.create(c))
        for kind, key, value in OLD_ROWS:
            row = {"kind": kind, "key_digest": digest(key), "key": key, "value": json.dumps(value)}
            await conn.execute(old.insert().values(**row, updated_at=1.0))


async def _version(store: Storage) -> int:
    table = store.tables.schema_version  # type: ignore[attr-defined]
    async with store.engine.connect() as conn:  # type: ignore[attr-defined]
        return int(await conn.scalar(select(table.c.version)))


async def _check_upgraded(factory: StoreFactory) -> None:
    store = factory.make()
    try:
        records = store.records
        for kind, key, value in OLD_ROWS:
            assert await records.get(kind, key) == value
            assert await records.list(kind) == [value]
        # Ownerless: a filtered listing shows none of them, whatever their values claim.
        assert await records.list("flow", user_name="ann") == []
        assert await records.list("flow", sys_code="s") == []
        await records.put("flow", "2", {"id": 2, "user_name": "ann"})
        assert await records.list("flow", user_name="ann") == [{"id": 2, "user_name": "ann"}]
        assert len(await records.list("flow")) == 2
        assert await _version(store) == SCHEMA_VERSION
        name = store.tables.records.name  # type: ignore[attr-defined]
        async with store.engine.connect() as conn:  # type: ignore[attr-defined]
            columns, indexes = await conn.run_sync(
                lambda c: (
                    {col["name"] for col in inspect(c).get_columns(name)},
                    {ix["name"] for ix in inspect(c).get_indexes(name)},
                )
            )
        assert {"user_name", "sys_code"} <= columns
        assert {ix.name for ix in store.tables.records.indexes} <= indexes  # type: ignore[attr-defined]
    finally:
        await store.aclose()


async def test_upgrade_from_version_2_keeps_rows_ownerless(sql_factory: StoreFactory) -> None:
    store = sql_factory.make()
    try:
        await store.append_turn(turn("kept", "t1", user_name="ann"))
        await _put_old_table(store)
        table = store.tables.schema_version  # type: ignore[attr-defined]
        async with store.engine.begin() as conn:  # type: ignore[attr-defined]
            await conn.execute(update(table).values(version=2))
    finally:
        await store.aclose()
    await _check_upgraded(sql_factory)
    store = sql_factory.make()
    try:
        assert [m.content for m in await store.read_messages("kept")] == ["q", "a"]
    finally:
        await store.aclose()


async def test_a_records_table_older_than_the_version_row_is_upgraded(sql_factory: StoreFactory) -> None:
    """Records used alone before: their table exists, the other tables do not."""
    store = sql_factory.make()
    try:
        await _put_old_table(store)
    finally:
        await store.aclose()
    store = sql_factory.make()
    tables = store.tables  # type: ignore[attr-defined]
    try:
        async with store.engine.begin() as conn:  # type: ignore[attr-defined]
            for table in (tables.schema_version, tables.turns, tables.messages, tables.conversations):
                await conn.run_sync(lambda c, t=table: t.drop(c, checkfirst=True))
    finally:
        await store.aclose()
    await _check_upgraded(sql_factory)
