"""Reaching a datasource: SQLAlchemy schema inspection and the read-only runner.

Each call opens its own engine (no pool) and disposes it, so a datasource
that is updated or deleted leaves no connection behind.

Read-only, per dialect, in addition to :mod:`convcore_scenes.sqlsafe`:

- SQLite: the file is opened ``mode=ro`` (a missing file is an error, never
  created) and ``PRAGMA query_only=ON``; a progress handler aborts the query
  at the timeout.
- PostgreSQL: the session defaults to read-only transactions
  (``default_transaction_read_only``), the query runs in ``BEGIN READ
  ONLY`` with ``statement_timeout``, and through a prepared statement, which
  refuses a second statement by itself; rows come from a cursor, so only
  ``max_rows + 1`` are fetched.
- MySQL/MariaDB: ``START TRANSACTION READ ONLY``, ``max_execution_time``
  (MySQL) / ``max_statement_time`` (MariaDB), an unbuffered cursor, rollback.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import inspect
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .datasources import DB_TYPES, Datasource

__all__ = ["Column", "QueryResult", "Table", "inspect_schema", "run_readonly"]

CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    primary_key: bool
    comment: str | None = None


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    comment: str | None = None

    def ddl(self) -> str:
        """The table as a short CREATE TABLE, the form models read best."""
        lines = []
        for c in self.columns:
            parts = [f"  {c.name} {c.type}"]
            if c.primary_key:
                parts.append("PRIMARY KEY")
            elif not c.nullable:
                parts.append("NOT NULL")
            if c.comment:
                parts.append(f"-- {c.comment}")
            lines.append(" ".join(parts))
        head = f"-- {self.comment}\n" if self.comment else ""
        return head + f"CREATE TABLE {self.name} (\n" + ",\n".join(lines) + "\n);"


@dataclass(frozen=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    truncated: bool  # more rows than max_rows existed


def _url(ds: Datasource) -> URL:
    driver = DB_TYPES[ds.db_type]
    query = {"charset": "utf8mb4"} if ds.db_type in {"mysql", "mariadb"} else {}
    return URL.create(
        driver,
        username=ds.db_user or None,
        password=ds.password or None,
        host=ds.db_host or None,
        port=ds.db_port or None,
        database=ds.db_name,
        query=query,
    )


def _engine(ds: Datasource, timeout: float) -> AsyncEngine:
    if ds.db_type == "sqlite":
        import aiosqlite

        uri = Path(ds.db_path).expanduser().resolve().as_uri() + "?mode=ro"
        deadline = time.monotonic() + timeout

        async def connect() -> Any:
            # Fail here, not in aiosqlite's thread: its failed connect can outlive the event loop.
            sqlite3.connect(uri, uri=True).close()
            conn = await aiosqlite.connect(uri, uri=True, timeout=timeout)
            await conn.execute("PRAGMA query_only=ON")
            await conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
            return conn

        return create_async_engine("sqlite+aiosqlite://", async_creator=connect, poolclass=NullPool)
    connect_args: dict[str, Any]
    if ds.db_type == "postgresql":
        connect_args = {
            "timeout": CONNECT_TIMEOUT,
            "server_settings": {
                "default_transaction_read_only": "on",
                "statement_timeout": str(int(timeout * 1000)),
                "lock_timeout": str(int(timeout * 1000)),
                "idle_in_transaction_session_timeout": str(int(timeout * 1000) + 5000),
                "application_name": "convcore chat_data",
            },
        }
    else:
        connect_args = {"connect_timeout": int(CONNECT_TIMEOUT)}
    return create_async_engine(_url(ds), poolclass=NullPool, connect_args=connect_args)


def _relevance(name: str, columns: Sequence[str], words: set[str]) -> int:
    lowered = name.lower()
    score = 10 if lowered in words else 0
    score += 3 * sum(1 for part in lowered.split("_") if part and part in words)
    score += sum(1 for c in columns if c.lower() in words)
    return score


def _inspect_sync(conn: Connection, words: set[str], max_tables: int) -> list[Table]:
    insp = inspect(conn)
    names = sorted(set(insp.get_table_names()) | set(insp.get_view_names()))
    if len(names) > max_tables:
        names = sorted(names, key=lambda n: (-_relevance(n, (), words), n))[:max_tables]
    cols: dict[str, Any] = {}
    pks: dict[str, Any] = {}
    try:
        cols = {key[1]: value for key, value in insp.get_multi_columns(filter_names=names).items()}
        pks = {key[1]: value for key, value in insp.get_multi_pk_constraint(filter_names=names).items()}
    except NoSuchTableError:  # a table dropped while we looked: go one by one
        for n in names:
            try:
                cols[n] = insp.get_columns(n)
                pks[n] = insp.get_pk_constraint(n)
            except NoSuchTableError:
                continue
    tables = []
    for n in names:
        if n not in cols:
            continue
        pk = set((pks.get(n) or {}).get("constrained_columns") or ())
        columns = tuple(
            Column(
                name=str(c["name"]),
                type=_type_name(c["type"]),
                nullable=bool(c.get("nullable", True)),
                primary_key=c["name"] in pk,
                comment=c.get("comment"),
            )
            for c in cols[n]
        )
        tables.append(Table(n, columns))
    tables.sort(key=lambda t: (-_relevance(t.name, [c.name for c in t.columns], words), t.name))
    return tables


def _type_name(sa_type: Any) -> str:
    try:
        return str(sa_type)
    except Exception:  # a type SQLAlchemy cannot render (NullType, odd reflections)
        return type(sa_type).__name__.upper()


async def inspect_schema(
    ds: Datasource, *, question: str = "", max_tables: int = 200, timeout: float = 15.0
) -> list[Table]:
    """The datasource's tables and views with their columns, the ones the
    question names first. Raises SQLAlchemyError/OSError if it cannot connect."""
    words = {w.lower() for w in re.findall(r"\w+", question)}
    engine = _engine(ds, timeout)
    try:
        with anyio.fail_after(timeout):
            async with engine.connect() as conn:
                return await conn.run_sync(_inspect_sync, words, max_tables)
    finally:
        await engine.dispose()


async def run_readonly(
    ds: Datasource, sql: str, *, max_rows: int = 100, timeout: float = 10.0
) -> QueryResult:
    """Run one already-checked SELECT read-only; at most ``max_rows`` rows.

    Raises TimeoutError past ``timeout``, or the driver's error."""
    engine = _engine(ds, timeout)
    try:
        with anyio.fail_after(timeout + CONNECT_TIMEOUT):
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver = raw.driver_connection
                if ds.db_type == "sqlite":
                    return await _run_sqlite(driver, sql, max_rows)
                if ds.db_type == "postgresql":
                    return await _run_postgres(driver, sql, max_rows, timeout)
                return await _run_mysql(driver, sql, max_rows, timeout)
    finally:
        await engine.dispose()


async def _run_sqlite(driver: Any, sql: str, max_rows: int) -> QueryResult:
    cursor = await driver.execute(sql)
    try:
        rows = await cursor.fetchmany(max_rows + 1)
        names = tuple(d[0] for d in cursor.description or ())
    finally:
        await cursor.close()
    return QueryResult(names, tuple(tuple(r) for r in rows[:max_rows]), len(rows) > max_rows)


async def _run_postgres(driver: Any, sql: str, max_rows: int, timeout: float) -> QueryResult:
    tx = driver.transaction(readonly=True)
    await tx.start()
    try:
        await driver.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
        stmt = await driver.prepare(sql)
        names = tuple(a.name for a in stmt.get_attributes())
        cursor = await stmt.cursor()
        rows = await cursor.fetch(max_rows + 1)
    finally:
        await tx.rollback()
    return QueryResult(names, tuple(tuple(r) for r in rows[:max_rows]), len(rows) > max_rows)


async def _run_mysql(driver: Any, sql: str, max_rows: int, timeout: float) -> QueryResult:
    import aiomysql  # type: ignore[import-untyped]

    setup = await driver.cursor()
    try:
        for statement in (
            f"SET SESSION max_statement_time = {timeout:.3f}",  # MariaDB (seconds)
            f"SET SESSION max_execution_time = {int(timeout * 1000)}",  # MySQL (ms)
        ):
            try:
                await setup.execute(statement)
            except aiomysql.Error:
                continue  # the other server's variable
        await setup.execute("START TRANSACTION READ ONLY")
    finally:
        await setup.close()
    try:
        cursor = await driver.cursor(aiomysql.SSCursor)
        try:
            await cursor.execute(sql)
            rows = await cursor.fetchmany(max_rows + 1)
            names = tuple(d[0] for d in cursor.description or ())
        finally:
            await cursor.close()
    finally:
        await driver.rollback()
    return QueryResult(names, tuple(tuple(r) for r in rows[:max_rows]), len(rows) > max_rows)
