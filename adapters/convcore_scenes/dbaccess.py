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
  (MySQL) / ``max_statement_time`` (MariaDB) (a server taking neither is
  not queried), an unbuffered cursor, rollback.

Every dialect runs the query read-only with a statement timeout; a
client-side deadline (``timeout`` plus the connect time) backs each one.
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
# The largest value a SQLite query may build, and the bytes of cells a query
# may bring back in all (the rows stop there, marked truncated); each cell is
# kept to MAX_CELL_BYTES.
MAX_VALUE_BYTES = 16 * 1024 * 1024
MAX_RESULT_BYTES = 8 * 1024 * 1024
MAX_CELL_BYTES = 4096


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

        def open_limited() -> sqlite3.Connection:
            raw = sqlite3.connect(uri, uri=True, timeout=timeout)
            # One value (randomblob(1e9), printf('%.*c', …)) may not eat the server's memory.
            raw.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
            raw.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            return raw

        async def connect() -> Any:
            # Fail here, not in aiosqlite's thread: its failed connect can outlive the event loop.
            sqlite3.connect(uri, uri=True).close()
            conn = aiosqlite.Connection(open_limited, iter_chunk_size=64)
            await conn
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
                # sqlsafe reads '…' strings without backslash escapes: make the server agree.
                "standard_conforming_strings": "on",
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


def _clip(value: Any) -> tuple[Any, int]:
    """A cell kept to MAX_CELL_BYTES, and about how many bytes it held."""
    if isinstance(value, str):
        return (value if len(value) <= MAX_CELL_BYTES else value[:MAX_CELL_BYTES]), len(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return (data if len(data) <= MAX_CELL_BYTES else data[:MAX_CELL_BYTES]), len(data)
    return value, 16


class _Rows:
    """Rows gathered up to ``max_rows`` and MAX_RESULT_BYTES."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rows: list[tuple[Any, ...]] = []
        self.size = 0
        self.truncated = False

    def add(self, batch: Sequence[Sequence[Any]]) -> bool:
        """Take ``batch``; False once no more rows are wanted."""
        for row in batch:
            if len(self.rows) >= self.max_rows or self.size > MAX_RESULT_BYTES:
                self.truncated = True
                return False
            cells = [_clip(v) for v in row]
            self.size += sum(n for _, n in cells)
            self.rows.append(tuple(v for v, _ in cells))
        return bool(batch)

    def result(self, names: tuple[str, ...]) -> QueryResult:
        return QueryResult(names, tuple(self.rows), self.truncated)


_BATCH = 10


async def _run_sqlite(driver: Any, sql: str, max_rows: int) -> QueryResult:
    cursor = await driver.execute(sql)
    rows = _Rows(max_rows)
    try:
        while rows.add(await cursor.fetchmany(_BATCH)):
            pass
        names = tuple(d[0] for d in cursor.description or ())
    finally:
        await cursor.close()
    return rows.result(names)


async def _run_postgres(driver: Any, sql: str, max_rows: int, timeout: float) -> QueryResult:
    tx = driver.transaction(readonly=True)
    await tx.start()
    try:
        await driver.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
        stmt = await driver.prepare(sql)
        names = tuple(a.name for a in stmt.get_attributes())
        cursor = await stmt.cursor()
        rows = _Rows(max_rows)
        while rows.add(await cursor.fetch(_BATCH)):
            pass
    finally:
        await tx.rollback()
    return rows.result(names)


_UNSAFE_SQL_MODES = {"NO_BACKSLASH_ESCAPES", "ANSI_QUOTES", "ANSI"}


async def _run_mysql(driver: Any, sql: str, max_rows: int, timeout: float) -> QueryResult:
    import aiomysql  # type: ignore[import-untyped]

    setup = await driver.cursor()
    try:
        timed = False
        for statement in (
            f"SET SESSION max_statement_time = {timeout:.3f}",  # MariaDB (seconds)
            f"SET SESSION max_execution_time = {int(timeout * 1000)}",  # MySQL (ms)
        ):
            try:
                await setup.execute(statement)
                timed = True
            except aiomysql.Error:
                continue  # the other server's variable
        if not timed:
            raise RuntimeError("the server takes no statement timeout, so the query was not run")
        # sqlsafe reads backslash escapes in strings and "…" as a string: make the session agree.
        await setup.execute("SELECT @@SESSION.sql_mode")
        (mode,) = await setup.fetchone()
        kept = [m for m in str(mode or "").split(",") if m and m not in _UNSAFE_SQL_MODES]
        await setup.execute("SET SESSION sql_mode = %s", (",".join(kept),))
        await setup.execute("START TRANSACTION READ ONLY")
    finally:
        await setup.close()
    try:
        cursor = await driver.cursor(aiomysql.SSCursor)
        rows = _Rows(max_rows)
        try:
            await cursor.execute(sql)
            while rows.add(await cursor.fetchmany(_BATCH)):
                pass
            names = tuple(d[0] for d in cursor.description or ())
        finally:
            await cursor.close()
    finally:
        await driver.rollback()
    return rows.result(names)
