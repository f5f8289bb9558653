"""Creating the tables on first use, and upgrading them later.

The tables carry a version, in a one-row ``<prefix>schema_version`` table.
:func:`ensure_schema` runs once per store object, under a lock that every
process starting at the same moment shares (a PostgreSQL advisory lock, a
MySQL ``GET_LOCK``, SQLite's write lock), so concurrent first users create
the tables once:

1. create the tables and indexes that do not exist yet (``checkfirst``);
2. insert the version row if there is none (a fresh database);
3. if the row says an older version, run ``MIGRATIONS[v]`` for each version
   ``v`` up to :data:`SCHEMA_VERSION`, bumping the row after each step;
4. if it says a newer one, refuse: this code would misread the tables.

To change the schema: edit the models in ``tables.py``, raise
``SCHEMA_VERSION`` by one, and add ``MIGRATIONS[old]``, a function that takes
the synchronous connection and the store's tables and brings existing tables
from ``old`` to ``old + 1`` (``ALTER TABLE``, backfills, new indexes). New
tables need no step: step 1 creates them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from sqlalchemy import Connection, Table, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from convcore.errors import StorageError

from .tables import Tables, exact_collation

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "drop_schema", "ensure_schema"]

SCHEMA_VERSION = 5


def _exact_names(conn: Connection, tables: Tables) -> None:
    """1 -> 2: on MySQL/MariaDB, user_name and sys_code compare exactly
    (binary, NO PAD) instead of in the server's default collation, which
    matched "ann" with "ANN" and "ann " in listings. Nothing elsewhere."""
    dialect = conn.dialect
    if dialect.name not in {"mysql", "mariadb"}:
        return
    quote = dialect.identifier_preparer.quote
    collation = exact_collation(dialect)
    columns = ", ".join(
        f"MODIFY {quote(c)} VARCHAR(256) CHARACTER SET utf8mb4 COLLATE {collation} NULL"
        for c in ("user_name", "sys_code")
    )
    conn.exec_driver_sql(f"ALTER TABLE {quote(tables.conversations.name)} {columns}")


def _record_owners(conn: Connection, tables: Tables) -> None:
    """2 -> 3: records carry their owner in ``user_name`` / ``sys_code``
    columns (exact collation, indexed by kind). Every existing row is kept,
    ownerless (NULL): an owner read back from old values was never checked.
    The records table may predate the version row (it had no version of its
    own), so this step checks what is there and also runs on a database
    that had no version row yet."""
    records = tables.records
    found = inspect(conn)
    if not found.has_table(records.name):
        return
    for name in ("user_name", "sys_code"):
        _add_column(conn, records, name)
    indexes = {index["name"] for index in found.get_indexes(records.name)}
    for index in records.indexes:
        if index.name not in indexes:
            index.create(conn)


def _parts_and_params(conn: Connection, tables: Tables) -> None:
    """3 -> 4: messages keep their image/audio/file content parts, and turns
    the generation parameters that shaped the reply (both JSON, NULL when
    there are none, as in every row written before)."""
    for table, column in ((tables.messages, "parts"), (tables.turns, "params")):
        _add_column(conn, table, column)


def _add_column(conn: Connection, table: Table, column: str) -> None:
    if any(c["name"] == column for c in inspect(conn).get_columns(table.name)):
        return  # a step cut short after this column was added
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    kind = table.c[column].type.compile(dialect=dialect)
    conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column)} {kind} NULL")


def _tool_calls(conn: Connection, tables: Tables) -> None:
    """4 -> 5: messages keep an assistant's tool calls (JSON, NULL when it
    made none, as in every row written before)."""
    _add_column(conn, tables.messages, "tool_calls")


# version -> the step that upgrades tables at that version to version + 1.
MIGRATIONS: dict[int, Callable[[Connection, Tables], None]] = {
    1: _exact_names,
    2: _record_owners,
    3: _parts_and_params,
    4: _tool_calls,
}

WRITE_OPTION = "convcore_write"  # SQLite: this transaction begins IMMEDIATE
READ_OPTION = "convcore_read"  # SQLite: single-statement reads, no BEGIN


def _lock_name(tables: Tables) -> str:
    return "convcore:" + hashlib.sha256(tables.conversations.name.encode()).hexdigest()[:40]


def _lock_key(tables: Tables) -> int:
    digest = hashlib.sha256(_lock_name(tables).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _create_and_upgrade(conn: Connection, tables: Tables) -> None:
    tables.metadata.create_all(conn, checkfirst=True)
    table = tables.schema_version
    version = conn.scalar(select(table.c.version).where(table.c.id == 1))
    if version is None:
        _record_owners(conn, tables)
        conn.execute(table.insert().values(id=1, version=SCHEMA_VERSION))
        return
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"tables {tables.conversations.name!r} are at schema version {version}, newer than "
            f"this convcore_sql ({SCHEMA_VERSION}); upgrade convcore"
        )
    while version < SCHEMA_VERSION:
        MIGRATIONS[version](conn, tables)
        version += 1
        conn.execute(table.update().where(table.c.id == 1).values(version=version))


async def ensure_schema(engine: AsyncEngine, tables: Tables) -> None:
    """Create or upgrade the tables, once, however many processes race."""
    backend = engine.dialect.name
    if backend == "postgresql":
        async with engine.begin() as conn:
            # DDL is transactional here: the lock and the tables commit together.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(tables)})
            await conn.run_sync(_create_and_upgrade, tables)
    elif backend in {"mysql", "mariadb"}:
        async with engine.connect() as conn:
            # DDL commits implicitly in MySQL: a session lock spans it.
            got = await conn.scalar(text("SELECT GET_LOCK(:n, 60)"), {"n": _lock_name(tables)})
            if got != 1:
                raise StorageError(f"timed out waiting for the schema lock {_lock_name(tables)!r}")
            try:
                await conn.run_sync(_create_and_upgrade, tables)
                await conn.commit()
            finally:
                await conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": _lock_name(tables)})
                await conn.commit()
    else:
        async with engine.connect() as conn:
            await conn.execution_options(**{WRITE_OPTION: True})
            async with conn.begin():
                await conn.run_sync(_create_and_upgrade, tables)


async def drop_schema(engine: AsyncEngine, tables: Tables) -> None:
    """Drop the store's tables (tests and teardown)."""
    async with engine.begin() as conn:
        await conn.run_sync(tables.metadata.drop_all, checkfirst=True)
