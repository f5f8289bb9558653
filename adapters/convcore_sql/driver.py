"""PostgreSQL's turn statements run straight on the asyncpg connection.

Through SQLAlchemy a statement costs more Python than its round trip: a
``Connection`` per checkout (with its isolation level set and reset), the
compiled-cache lookup, the parameters and every value of every row passed
through processors, greenlet switches, a cursor. The turn's statements
(``context``, ``tail``, ``append_one``) are compiled once instead, with
the engine's dialect, and run on the pooled connection's driver. Types
stay SQLAlchemy's: parameters go through the compiled statement's own bind
processors, and result values through the processors SQLAlchemy picks for
the columns' types and the types the server reports. A connection comes
from the engine's pool and goes back to it; a driver error is wrapped as
SQLAlchemy wraps it (``DBAPIError``, ``connection_invalidated``), and a
lost or cancelled connection is invalidated as SQLAlchemy invalidates it,
so retries and error mapping see what they always saw.

The statements run outside any transaction, each its own, as they do on
the store's AUTOCOMMIT reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import Executable
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

__all__ = [
    "DriverConnection",
    "DriverStatement",
    "PgDriver",
    "process_row",
    "processors_by_type",
    "supports",
    "unobserved",
]

Processor = Callable[[Any], Any] | None


def supports(engine: AsyncEngine) -> bool:
    """Whether ``engine`` runs on asyncpg, the driver this module speaks."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"


def unobserved(engine: AsyncEngine) -> bool:
    """Whether nothing watches the engine's statements: no echo, no
    cursor or error listeners (tracing, logging, custom disconnect
    rules), which a path straight on the driver would leave out."""
    sync = engine.sync_engine
    dispatch = sync.dispatch
    return not (
        sync.echo
        or dispatch.before_cursor_execute
        or dispatch.after_cursor_execute
        or sync.dialect.dispatch.handle_error
    )


def processors_by_type(types: Sequence[Any], dialect: Dialect) -> tuple[Processor, ...]:
    """Result processors by the columns' declared types alone, for a driver
    that reports no types of its own (SQLite's)."""
    return tuple(t._cached_result_processor(dialect, None) for t in types)


def process_row(results: Sequence[Processor], row: Sequence[Any]) -> list[Any]:
    """A row's values as SQLAlchemy's result would hold them."""
    return [value if p is None else p(value) for p, value in zip(results, row, strict=True)]


class DriverStatement:
    """``stmt`` compiled once for ``dialect``: its SQL, the order and bind
    processors of its parameters, and (after the first run) the result
    processors of its columns."""

    __slots__ = ("_binds", "_dialect", "_get", "_processed", "_results", "_types", "sql")

    def __init__(self, stmt: Executable, dialect: Dialect, column_keys: Sequence[str] | None = None) -> None:
        # ``column_keys``: an INSERT's columns, those its rows give (as ``execute`` compiles it).
        clause = cast(ClauseElement, stmt)
        compiled = cast(SQLCompiler, clause.compile(dialect=dialect, column_keys=column_keys))
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("a statement rendered anew per call (IN lists) cannot be compiled once")
        processors: dict[str, Any] = dict(compiled._bind_processors)
        self.sql: str = compiled.string
        binds: list[tuple[str | None, Processor, Any]] = []
        for name in compiled.positiontup or ():
            param, bind = compiled.binds[name], processors.get(name)
            if param.required:
                binds.append((name, bind, None))
            else:  # a value the statement holds (``count + 1``): processed once
                value = param.effective_value
                binds.append((None, None, value if bind is None else bind(value)))
        self._binds = tuple(binds)
        # All parameters given (no values of the statement's own): taken in
        # one C call, and only those with a processor processed.
        self._get: Callable[[dict[str, Any]], Any] | None = None
        self._processed: tuple[tuple[int, Callable[[Any], Any]], ...] = ()
        names = [name for name, _, _ in binds if name is not None]
        if names and len(names) == len(binds):
            self._get = itemgetter(*names) if len(names) > 1 else lambda params: (params[names[0]],)
            self._processed = tuple((i, bind) for i, (_, bind, _) in enumerate(binds) if bind is not None)
        self._types = [column.type for column in compiled._result_columns or ()]
        self._dialect = dialect
        self._results: tuple[Processor, ...] | None = None

    def args(self, params: dict[str, Any]) -> list[Any]:
        if self._get is not None:
            values = list(self._get(params))
            for i, bind in self._processed:
                values[i] = bind(values[i])
            return values
        return [
            value if name is None else params[name] if bind is None else bind(params[name])
            for name, bind, value in self._binds
        ]

    def process(self, row: Sequence[Any]) -> list[Any]:
        assert self._results is not None
        return process_row(self._results, row)

    def results_by_type(self) -> None:
        """:func:`processors_by_type` for this statement's columns."""
        self._results = processors_by_type(self._types, self._dialect)

    async def _learn_results(self, driver: Any) -> None:
        # SQLAlchemy picks a column's processor by the type the server
        # reports for it (a float8 needs none, a numeric a conversion).
        attributes = (await driver.prepare(self.sql)).get_attributes()
        self._results = tuple(
            t._cached_result_processor(self._dialect, a.type.oid)
            for t, a in zip(self._types, attributes, strict=True)
        )


def fair_gate(engine: AsyncEngine) -> asyncio.Semaphore | None:
    """First come, first served for the pool's connections: a semaphore of
    the pool's size in front of it. The pool's own queue lets a task that
    asks while a returned connection is on its way to a waiter take it, and
    that waiter queues again at the back: under load the turns that waited
    longest waited longer still. None for a pool without a fixed size."""
    pool = engine.sync_engine.pool
    overflow = getattr(pool, "_max_overflow", None)
    if not isinstance(pool, QueuePool) or not isinstance(overflow, int) or overflow < 0:
        return None
    return asyncio.Semaphore(pool.size() + overflow)


class PgDriver:
    """Connections from ``engine``'s pool, running statements on their driver."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._statements: dict[int, tuple[Executable, DriverStatement]] = {}
        self._gate = fair_gate(engine)

    def unobserved(self) -> bool:
        return unobserved(self._engine)

    def connect(self) -> DriverConnection:
        """``async with driver.connect() as conn``: a pooled connection."""
        return DriverConnection(self)

    def statement(self, stmt: Executable) -> DriverStatement:
        """``stmt`` compiled for the driver, once (the store's statements
        live as long as the store)."""
        found = self._statements.get(id(stmt))
        if found is None:
            found = self._statements[id(stmt)] = (stmt, DriverStatement(stmt, self._engine.dialect))
        return found[1]


class DriverConnection:
    """A pooled connection, given back on exit; invalidated (closed, and
    the pool's older connections marked stale, as SQLAlchemy does) when it
    was lost, and closed when a statement on it was cancelled."""

    __slots__ = ("_driver", "_engine", "_fairy", "_lost", "_raw")

    def __init__(self, driver: PgDriver) -> None:
        self._driver = driver
        self._engine = driver._engine
        self._lost = False

    async def __aenter__(self) -> DriverConnection:
        gate = self._driver._gate
        if gate is not None:
            await gate.acquire()
        try:
            self._fairy: PoolProxiedConnection = await self._engine.raw_connection()
        except BaseException:
            if gate is not None:
                gate.release()
            raise
        self._raw: Any = self._fairy.driver_connection
        return self

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is not None and (self._lost or not isinstance(exc, Exception)):
                await greenlet_spawn(self._invalidate, exc)
        finally:
            self._fairy.close()
            if self._driver._gate is not None:
                self._driver._gate.release()

    def statement(self, stmt: Executable) -> DriverStatement:
        return self._driver.statement(stmt)

    async def rows(self, stmt: Executable, params: dict[str, Any]) -> list[list[Any]]:
        """``stmt``'s rows, values as SQLAlchemy's result holds them."""
        compiled = self._driver.statement(stmt)
        return [compiled.process(row) for row in await self.fetch(compiled, params)]

    async def fetch(self, stmt: DriverStatement, params: dict[str, Any]) -> list[Any]:
        """``stmt``'s rows as the driver gives them (asyncpg records)."""
        args = stmt.args(params)
        try:
            if stmt._results is None:
                await stmt._learn_results(self._raw)
            rows: list[Any] = await self._raw.fetch(stmt.sql, *args)
        except Exception as exc:
            raise self._wrapped(exc, stmt.sql, args) from exc
        return rows

    def _wrapped(self, exc: Exception, sql: str, args: list[Any]) -> Exception:
        """``exc`` as ``Connection.execute`` raises it: translated to the
        DBAPI's error by SQLAlchemy's adapter, then wrapped; a lost
        connection is marked so, and invalidated on exit."""
        dialect = self._engine.dialect
        dbapi = dialect.loaded_dbapi
        translated: Exception = exc
        try:
            self._fairy.dbapi_connection._handle_exception(exc)  # type: ignore[union-attr]
        except Exception as error:
            translated = error
        lost = isinstance(translated, dbapi.Error) and self._raw.is_closed()
        self._lost = self._lost or lost
        wrapped: Exception = sa_exc.DBAPIError.instance(
            sql,
            args,
            translated,
            dbapi.Error,
            hide_parameters=self._engine.sync_engine.hide_parameters,
            connection_invalidated=lost,
            dialect=dialect,
        )
        return wrapped

    def _invalidate(self, exc: BaseException) -> None:
        if self._lost:
            self._engine.sync_engine.pool._invalidate(self._fairy, exc)
        if self._fairy.is_valid:
            self._fairy.invalidate(exc)
