"""A SQLite batch in one trip to the driver's thread.

aiosqlite runs every statement in a thread of its own connection, and a
statement through SQLAlchemy takes about three trips there and back (a
cursor, its execute, its rows); each trip's answer waits for the event loop
to finish whatever else it is running. A group-committed batch (BEGIN, two
reads, three or four writes, COMMIT) was about twenty trips, all while it
held the database's write lock: with one worker a batch held it for 72 ms
of wall time, and with two workers the lock was held 80% of the run while
each process waited for it. Here the whole batch, its reads, its numbering
and its writes, runs as one function in the connection's thread, so the
lock is held for SQLite's own work and nothing else.

The statements are the store's, compiled once with the engine's dialect
(``driver.DriverStatement``): parameters through their bind processors and
values through their result processors, as ``execute`` would. An engine
whose statements something watches (echo, cursor or error listeners) keeps
SQLAlchemy's path (``run_sync``), as does an aiosqlite without the thread
hook this uses; both paths run the same batch function (``BatchDB``).

A turn's reads (its context) take the same way, in a read transaction
(one snapshot for the trip, so a read of several statements sees them
agree), and reads that wait at the same time share one trip
(``convcore.single_writer``: a lone read goes at once, those that queue
meanwhile go together next), so under load a read's checkout and trip are
paid once for many. A connection that
comes back outside any transaction (after COMMIT, or after reads) goes back
to the pool as SQLAlchemy's own ``Connection.close`` returns one whose
transaction it ended: without the pool's reset, a ROLLBACK of nothing that
would cost a trip of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Connection, Executable
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

from convcore.single_writer import Pending, SingleWriter

from .driver import DriverStatement, Processor, process_row, processors_by_type, unobserved

__all__ = ["BatchDB", "NoThreadHook", "SqliteTrip", "SyncBatchDB", "ThreadDB"]

T = TypeVar("T")
W = TypeVar("W")
Read = Callable[["ThreadDB"], Any]
Answer = tuple[Any, Exception | None]

MAX_READS = 64  # reads sharing one trip, at most


class NoThreadHook(RuntimeError):
    """The driver cannot run a function in its connection's thread."""


class BatchDB(Protocol):
    """What a batch needs of its connection, whichever path it runs on."""

    def rows(self, stmt: Executable, params: dict[str, Any]) -> Sequence[Sequence[Any]]: ...

    def many(self, stmt: Executable, rows: list[dict[str, Any]]) -> None: ...


class SyncBatchDB:
    """SQLAlchemy's connection, inside ``AsyncConnection.run_sync``."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def rows(self, stmt: Executable, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        return self._conn.execute(stmt, params).all()

    def many(self, stmt: Executable, rows: list[dict[str, Any]]) -> None:
        self._conn.execute(stmt, rows)


class ThreadDB:
    """sqlite3's connection, in aiosqlite's thread."""

    def __init__(self, raw: sqlite3.Connection, trip: SqliteTrip) -> None:
        self._raw = raw
        self._trip = trip

    def rows(self, stmt: Executable, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        listed = self._trip.in_list(stmt, params)
        if listed is not None:
            sql, args, results = listed
            return [process_row(results, row) for row in self._raw.execute(sql, args).fetchall()]
        compiled = self._trip.statement(stmt)
        return [
            compiled.process(row) for row in self._raw.execute(compiled.sql, compiled.args(params)).fetchall()
        ]

    def fetch(self, stmt: Executable, params: dict[str, Any]) -> list[Any]:
        """``stmt``'s rows as sqlite3 gives them: no result processing."""
        compiled = self._trip.statement(stmt)
        return self._raw.execute(compiled.sql, compiled.args(params)).fetchall()

    def many(self, stmt: Executable, rows: list[dict[str, Any]]) -> None:
        compiled = self._trip.statement(stmt, tuple(rows[0]))
        self._raw.executemany(compiled.sql, [compiled.args(row) for row in rows])


class SqliteTrip:
    """Runs a batch function whole in a pooled connection's aiosqlite
    thread, and reads in trips they share."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._reads: SingleWriter[Read, Any] = SingleWriter(
            self._read_trip, max_batch=MAX_READS, shielded=False
        )
        self._statements: dict[tuple[int, tuple[str, ...] | None], tuple[Executable, DriverStatement]] = {}
        self._lists: dict[tuple[int, int], tuple[Executable, str, tuple[Processor, ...]]] = {}

    def usable(self) -> bool:
        """Whether nothing watches the engine's statements (which this path would leave out)."""
        return unobserved(self._engine)

    async def batch(self, work: Callable[[ThreadDB], T]) -> T:
        """``work`` between BEGIN IMMEDIATE and COMMIT, in one trip; rolled
        back if it raises. Raises :class:`NoThreadHook`, having done nothing,
        when this aiosqlite has no thread hook (the caller then takes
        SQLAlchemy's path)."""
        return await self._run(self._in_thread, work)

    async def read(self, work: Callable[[ThreadDB], T]) -> T:
        """``work``'s reads, in a trip shared with the reads waiting with it
        and one read transaction (the same snapshot for all of them); what
        it raises is its own. :class:`NoThreadHook` as for :meth:`batch`."""
        result: T = await self._reads.submit(work)
        return result

    async def aclose(self) -> None:
        """Wait for the reads under way."""
        await self._reads.aclose()

    async def _read_trip(self, taken: list[Pending[Read, Any]]) -> None:
        waiting = [p for p in taken if not p.future.done()]  # a caller gone is skipped
        if not waiting:
            return
        answers = await self._run(self._reads_in_thread, [p.item for p in waiting])
        for pending, (value, error) in zip(waiting, answers, strict=True):
            pending.settle(value=value, error=error)

    async def _run(
        self,
        in_thread: Callable[[sqlite3.Connection, W], tuple[T, bool]],
        work: W,
    ) -> T:
        fairy = await self._engine.raw_connection()
        idle = False  # known to be outside any transaction: nothing for the pool's reset to undo
        try:
            driver: Any = fairy.driver_connection
            run = getattr(driver, "_execute", None)
            if run is None:
                raise NoThreadHook("this aiosqlite cannot run a function in its thread")
            result, idle = await run(in_thread, driver._conn, work)
            return result
        finally:
            # Returned as SQLAlchemy returns it, where the adapter can await:
            # after its transaction ended, as Connection.close does (no
            # reset); else with the pool's reset, a rollback (a trip of its
            # own). A cancelled caller leaves the work to finish in the
            # thread; the reset queues behind it there.
            if idle:
                await greenlet_spawn(fairy._close_special, transaction_reset=True)  # type: ignore[attr-defined]
            else:
                await greenlet_spawn(fairy.close)

    def _in_thread(self, raw: sqlite3.Connection, work: Callable[[ThreadDB], T]) -> tuple[T, bool]:
        raw.execute("BEGIN IMMEDIATE")
        try:
            result = work(ThreadDB(raw, self))
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            raise
        return result, not raw.in_transaction

    def _reads_in_thread(self, raw: sqlite3.Connection, works: list[Read]) -> tuple[list[Answer], bool]:
        db = ThreadDB(raw, self)
        answers: list[Answer] = []
        raw.execute("BEGIN")  # deferred: a read transaction, one snapshot for the trip's reads
        try:
            for work in works:
                try:
                    answers.append((work(db), None))
                except Exception as exc:  # this read's alone
                    answers.append((None, exc))
        finally:
            if raw.in_transaction:
                raw.execute("COMMIT")
        return answers, not raw.in_transaction

    def statement(self, stmt: Executable, column_keys: tuple[str, ...] | None = None) -> DriverStatement:
        """``stmt`` compiled once (per set of columns an INSERT is given)."""
        key = (id(stmt), column_keys)
        found = self._statements.get(key)
        if found is None:
            compiled = DriverStatement(stmt, self._engine.dialect, column_keys)
            compiled.results_by_type()
            found = self._statements[key] = (stmt, compiled)
        return found[1]

    def in_list(
        self, stmt: Executable, params: dict[str, Any]
    ) -> tuple[str, list[Any], tuple[Processor, ...]] | None:
        """A statement whose one parameter is an IN list: its SQL for a list
        of this length rounded up to a power of two (compiled once per such
        length: a few shapes serve every batch size), the list padded with
        its last value (a value listed twice matches its rows once) as
        arguments, and its rows' processing; None for any other statement."""
        if len(params) != 1:
            return None
        ((name, values),) = params.items()
        if not isinstance(values, list):
            return None
        size = 1 << (len(values) - 1).bit_length() if values else 0
        key = (id(stmt), size)
        found = self._lists.get(key)
        if found is None:
            dialect = self._engine.dialect
            shaped = cast(ClauseElement, stmt).params({name: [""] * size})
            compiled = cast(
                SQLCompiler, shaped.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
            )
            types = [column.type for column in compiled._result_columns or ()]
            found = self._lists[key] = (stmt, compiled.string, processors_by_type(types, dialect))
        _, sql, results = found
        return sql, values + values[-1:] * (size - len(values)), results
