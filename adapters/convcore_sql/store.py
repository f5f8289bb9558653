"""The SQL store: conversations in SQLite, PostgreSQL or MySQL/MariaDB.

An append is one transaction that first locks the conversation's row (creating
it if absent), so appends to one conversation serialise while others run in
parallel:

- PostgreSQL: ``SELECT … FOR UPDATE``; a missing row is created with
  ``INSERT … ON CONFLICT DO NOTHING`` (holding its lock).
- MySQL/MariaDB (READ COMMITTED): ``SELECT … FOR UPDATE``; a missing row is
  created with ``INSERT … ON DUPLICATE KEY UPDATE`` (a no-op that takes the
  row lock, so racing creators queue instead of deadlocking).
- SQLite (WAL): writers open ``BEGIN IMMEDIATE`` and so serialise on the
  database's write lock (waiting up to ``busy_timeout``); readers are not
  blocked.

Under the lock: a stored turn_id returns the stored turn (``duplicate``),
then ``expect_last_seq`` is checked, then the messages get the next seqs and
running token totals, the turn record is written and the row updated.
Deadlocks, serialization failures, busy databases and lost connections are
retried from the top with jittered backoff; the turn_id makes that safe even
when a commit's outcome was unknown. The statements, and how few of them a
turn takes on each dialect, are in statements.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any, TypeVar

from sqlalchemy import Executable, event, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from convcore.errors import (
    ConflictError,
    InvalidRequestError,
    MissingDependencyError,
    PermissionDeniedError,
    StorageError,
)
from convcore.models import (
    AppendResult,
    Conversation,
    Message,
    MessageDraft,
    TurnContext,
    TurnRecord,
    TurnWrite,
)
from convcore.storekit import apply_turn, check_turn_owner, conflict_message, number_messages, turn_record

from .driver import DriverConnection, PgDriver, supports
from .errors import Kind, classify, is_driver_error, to_storage_error
from .group_commit import GroupCommit, Outcome
from .message_cache import RawMessageCache, decode_message
from .records import SQLRecords
from .schema import READ_OPTION, WRITE_OPTION, drop_schema, ensure_schema
from .sqlite_trip import BatchDB, NoThreadHook, SqliteTrip, SyncBatchDB, ThreadDB
from .statements import CONV_COLUMNS, MSG_COLUMNS, TURN_COLUMNS, Statements
from .tables import Tables, bind_tables, digest
from .urls import engine_options, to_async_url
from .write_lock import FileWriteLock, database_file, lock_path_for

__all__ = ["SQLStore"]

T = TypeVar("T")

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_NAME_LIMIT = 256  # the width of user_name / sys_code columns
_PACKET_MARGIN = 64 * 1024  # room for the rest of the statement around the texts
_MAX_BUDGET = 2**62  # more tokens than any conversation holds; fits a BIGINT bound


class SQLStore:
    """Conversations, and in :attr:`records` the chat modes' records, in SQL
    tables named ``<table_prefix>…``, on one engine (one pool).

    ``SQLStore(engine)`` uses an :class:`AsyncEngine` you own: ``aclose()``
    leaves it open. :meth:`from_url` builds and owns one. Nothing connects
    until the first call, which creates the tables if needed. One store
    object serves one event loop (its engine's connections belong to it);
    use a store per loop or process, on the same tables.

    On SQLite the store installs two listeners on the engine: connections
    get WAL mode and a ``busy_timeout``, and writes begin IMMEDIATE.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        table_prefix: str = "convcore_",
        retries: int = 8,
        busy_timeout: float = 30.0,
        group_commit: bool | None = None,
    ) -> None:
        if not _PREFIX.fullmatch(table_prefix):
            raise InvalidRequestError(
                "use 1-32 letters, digits or underscores, not starting with a digit", field="table_prefix"
            )
        self._engine = engine
        self._owns_engine = False
        self._tables: Tables = bind_tables(table_prefix)
        self._backend = engine.dialect.name
        self._retries = max(1, retries)
        self._ready = False
        self._max_packet: int | None = None  # MySQL/MariaDB's statement size limit
        self._schema_lock = asyncio.Lock()
        self._sql = Statements(self._tables, self._backend)
        # Option engines on the same pool, so no call sets options per connection.
        self._reader = engine
        self._writer = engine
        if self._backend == "postgresql":
            # Reads run one statement: no BEGIN/ROLLBACK round trips.
            self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        if self._backend == "sqlite":
            _install_sqlite_listeners(engine, busy_timeout)
            self._reader = engine.execution_options(**{READ_OPTION: True})
            self._writer = engine.execution_options(**{WRITE_OPTION: True})
        # PostgreSQL on asyncpg: the turn's statements skip SQLAlchemy's execute (see driver.py).
        self._driver = PgDriver(engine) if supports(engine) else None
        self._messages = RawMessageCache()
        # Keyed by values as the driver reads them (PostgreSQL text still
        # escaped): a key space of its own, apart from decoded rows' keys.
        self._driver_messages = RawMessageCache() if self._driver is not None else self._messages
        self.records = SQLRecords(self)
        if group_commit is None:
            group_commit = self._backend == "sqlite"
        self._group: GroupCommit[TurnWrite, AppendResult] | None = (
            GroupCommit(self._append_batch, self._append_alone) if group_commit else None
        )
        # Batches on a SQLite file take turns with other processes' by a lock
        # that wakes its waiter (write_lock.py), not by SQLite's busy handler.
        # A batch runs whole in the driver's thread, one trip, and so do a
        # turn's reads (sqlite_trip.py).
        self._trip = SqliteTrip(engine) if self._backend == "sqlite" else None
        lock_path = lock_path_for(engine.url.database) if self._backend == "sqlite" else None
        self._write_lock = FileWriteLock(lock_path) if lock_path and self._group is not None else None
        self._file = database_file(engine.url.database) if self._backend == "sqlite" else None
        self._file_id: tuple[int, int] | None = None

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        table_prefix: str | None = None,
        retries: int = 8,
        busy_timeout: float = 30.0,
        group_commit: bool | None = None,
        **options: Any,
    ) -> SQLStore:
        """A store on an engine of its own for ``url`` (``sqlite:///x.db``,
        ``postgresql://…``, ``mysql://…``, ``mariadb://…``; the async driver is
        picked unless named). ``options`` go to ``create_async_engine``.

        The URL may carry ``?table_prefix=…`` (as a Redis URL carries
        ``?prefix=``), so one string picks both database and tables; the
        keyword argument, when given, wins.
        """
        async_url = to_async_url(url)
        in_url = async_url.query.get("table_prefix")
        if in_url is not None:
            async_url = async_url.difference_update_query(["table_prefix"])
            if table_prefix is None:  # an explicit keyword wins, even "convcore_"
                table_prefix = in_url if isinstance(in_url, str) else in_url[-1]
        if table_prefix is None:
            table_prefix = "convcore_"
        flag = async_url.query.get("group_commit")
        if flag is not None:
            async_url = async_url.difference_update_query(["group_commit"])
            if group_commit is None:
                group_commit = _flag(flag if isinstance(flag, str) else flag[-1], "group_commit")
        try:
            engine = create_async_engine(async_url, **engine_options(async_url, options))
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(f"the {async_url.drivername} store", "sql") from exc
        store = cls(
            engine,
            table_prefix=table_prefix,
            retries=retries,
            busy_timeout=busy_timeout,
            group_commit=group_commit,
        )
        store._owns_engine = True
        return store

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def tables(self) -> Tables:
        return self._tables

    async def aclose(self) -> None:
        if self._group is not None:
            await self._group.aclose()
        if self._trip is not None:
            await self._trip.aclose()
        if self._write_lock is not None:
            self._write_lock.close()
        if self._owns_engine:
            await self._engine.dispose()

    async def ping(self) -> None:
        """Readiness beyond a read: a SQLite file is still the file this
        store opened and may be written. A read alone passes on a file made
        read-only, where every turn then fails, or deleted, where pooled
        connections go on writing turns into the unlinked file."""
        if self._file is None:
            return
        try:
            found = os.stat(self._file)
        except OSError as exc:
            raise StorageError(f"the SQLite database file is gone ({exc.strerror})") from None
        file_id = (found.st_dev, found.st_ino)
        if self._file_id is None:
            self._file_id = file_id
        elif file_id != self._file_id:
            raise StorageError("the SQLite database file was replaced since this store opened it")
        if not (os.access(self._file, os.W_OK) and os.access(os.path.dirname(self._file) or ".", os.W_OK)):
            raise StorageError("the SQLite database file, or its directory, cannot be written")

    # -- reads -------------------------------------------------------------

    async def get_conversation(self, conv_uid: str) -> Conversation | None:
        params = {"key": digest(conv_uid)}

        async def op() -> Conversation | None:
            async with self._reader.connect() as conn:
                row = (await conn.execute(self._sql.conversation, params)).first()
            return _conversation(row) if row is not None else None

        return await self._run("get_conversation", op)

    async def get_turn(self, conv_uid: str, turn_id: str) -> TurnRecord | None:
        key = digest(conv_uid)

        async def op() -> TurnRecord | None:
            async with self._reader.connect() as conn:
                return await self._turn(conn, key, conv_uid, turn_id)

        return await self._run("get_turn", op)

    async def read_tail(self, conv_uid: str, max_tokens: int) -> list[Message]:
        if max_tokens < 0:
            return []
        max_tokens = min(max_tokens, _MAX_BUDGET)
        key = digest(conv_uid)
        params = {"key": key, "turn_key": "", "budget": max_tokens}

        async def op() -> list[Message]:
            read = await self._sqlite_context(params, with_turn=False)
            if read is not None:
                return self._raw_tail(read[1])
            async with self._turn_connection() as conn:
                rows = await _rows(conn, self._sql.context, params)
                return await self._tail(conn, key, rows, max_tokens) if rows else []

        return await self._run("read_tail", op)

    async def read_context(
        self, conv_uid: str, max_tokens: int, *, turn_id: str | None = None
    ) -> TurnContext:
        """The conversation row, whether ``turn_id`` is stored, and the tail
        bounded by the row's totals: one statement (two on PostgreSQL, see
        statements.py). A stored turn's messages take one more."""
        key = digest(conv_uid)
        # Any negative budget reads no tail; clamped so ``total - budget``
        # stays within a BIGINT (MySQL refuses the overflow).
        max_tokens = min(max(max_tokens, -1), _MAX_BUDGET)
        params = {
            "key": key,
            "turn_key": digest(turn_id) if turn_id is not None else "",
            "budget": max_tokens,
        }

        async def op() -> TurnContext:
            read = await self._sqlite_context(params, with_turn=turn_id is not None)
            if read is not None:
                head, tail_rows, turn_rows = read
                if head is None:
                    return TurnContext(conversation=None)
                found = _conversation(_decoded_head(head))
                if turn_id is None or turn_rows is None:
                    return TurnContext(conversation=found, tail=tuple(self._raw_tail(tail_rows)))
                turn = _turn_record(turn_rows, conv_uid, turn_id)
            else:
                async with self._turn_connection() as conn:
                    rows = await _rows(conn, self._sql.context, params)
                    if not rows:
                        return TurnContext(conversation=None)
                    found = _conversation(rows[0])
                    if turn_id is None or rows[0][_TURN_SEQ] is None:
                        tail = await self._tail(conn, key, rows, max_tokens)
                        return TurnContext(conversation=found, tail=tuple(tail))
                    turn = await self._turn(conn, key, conv_uid, turn_id)
            if turn is None:  # the conversation was deleted in between
                raise _StartOver
            return TurnContext(conversation=found, turn=turn)

        return await self._run("read_context", op)

    async def read_messages(
        self, conv_uid: str, *, start_seq: int = 1, limit: int | None = None
    ) -> list[Message]:
        if limit is not None and limit <= 0:
            return []
        msgs = self._tables.messages
        stmt = (
            select(*[msgs.c[n] for n in MSG_COLUMNS])
            .where(msgs.c.conv_key == digest(conv_uid), msgs.c.seq >= start_seq)
            .order_by(msgs.c.seq)
            .limit(limit)
        )

        async def op() -> list[Message]:
            async with self._reader.connect() as conn:
                return [decode_message(row) for row in await conn.execute(stmt)]

        return await self._run("read_messages", op)

    async def list_conversations(
        self,
        *,
        user_name: str | None = None,
        sys_code: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> list[Conversation]:
        if limit <= 0:
            return []
        conv = self._tables.conversations
        stmt = select(*[conv.c[n] for n in CONV_COLUMNS])
        if user_name is not None:
            stmt = stmt.where(conv.c.user_name == user_name)
        if sys_code is not None:
            stmt = stmt.where(conv.c.sys_code == sys_code)
        stmt = stmt.order_by(conv.c.updated_at.desc(), conv.c.conv_key.desc()).offset(max(offset, 0))
        stmt = stmt.limit(limit)

        async def op() -> list[Conversation]:
            async with self._reader.connect() as conn:
                return [_conversation(row) for row in await conn.execute(stmt)]

        return await self._run("list_conversations", op)

    # -- writes ------------------------------------------------------------

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        for name in ("user_name", "sys_code"):
            value = getattr(turn, name)
            if value is not None and len(value) > _NAME_LIMIT:
                raise InvalidRequestError(f"longer than {_NAME_LIMIT} characters", field=name)
        if self._group is not None:
            return await self._group.submit(turn)
        return await self._append_alone(turn)

    async def _append_alone(self, turn: TurnWrite) -> AppendResult:
        return await self._run("append_turn", lambda: self._checked_append(turn))

    async def _checked_append(self, turn: TurnWrite) -> AppendResult:
        self._check_packet(turn)
        one = self._sql.append_one(len(turn.messages), system=turn.system is not None, model=bool(turn.model))
        if one is not None:
            done = await self._append_one(one, turn)
            if done is not None:
                return done
        return await self._append(turn)

    async def _append_one(self, stmt: Executable, turn: TurnWrite) -> AppendResult | None:
        """PostgreSQL: the append as one statement on its own (see
        ``Statements.append_one``); None when the conversation does not
        exist yet (the transaction of ``_append`` creates it)."""
        key, turn_key = digest(turn.conv_uid), digest(turn.turn_id)
        async with self._turn_connection() as conn:
            rows = await _rows(conn, stmt, _one_statement_params(key, turn_key, turn))
            if not rows:
                return None
            row = rows[0]
            n = len(CONV_COLUMNS)
            if row[n + 1 + _COUNT] is not None:
                new = _conversation(row[n + 1 :])
                messages = number_messages(turn, new.message_count - len(turn.messages) + 1)
                return AppendResult(conversation=new, turn=turn_record(turn, messages), duplicate=False)
            found = _conversation(row[:n])
            check_turn_owner(found, turn)  # refused by the owner rule: nothing was written
            # Stored, or refused by expect_last_seq: a turn id committed while
            # the statement waited for the lock is not in its snapshot, so
            # look again before calling it a conflict.
            stored = await self._turn(conn, key, turn.conv_uid, turn.turn_id)
        if stored is not None:
            return AppendResult(conversation=found, turn=stored, duplicate=True)
        if row[n] or turn.expect_last_seq is None:  # the turn vanished: deleted in between
            raise _StartOver
        raise ConflictError(conflict_message(turn.conv_uid, turn.expect_last_seq, found.message_count))

    def _check_packet(self, turn: TurnWrite) -> None:
        if self._max_packet is not None:
            # MySQL/MariaDB drop the connection on a statement larger than
            # max_allowed_packet; retrying would only resend it. Say so first.
            size = sum(len(m.content.encode("utf-8")) + _parts_size(m) for m in turn.messages)
            if size > self._max_packet - _PACKET_MARGIN:
                raise StorageError(
                    f"this turn's messages hold {size} bytes, more than the database server's "
                    f"max_allowed_packet ({self._max_packet} bytes) allows in one statement"
                )

    async def delete_conversation(self, conv_uid: str) -> bool:
        params = {"key": digest(conv_uid)}

        async def op() -> bool:
            async with self._writer.begin() as conn:
                if (await conn.execute(self._sql.lock_plain, params)).first() is None:
                    return False
                for stmt in self._sql.deletes:
                    await conn.execute(stmt, params)
                return True

        return await self._run("delete_conversation", op)

    async def drop_tables(self) -> None:
        """Drop this store's tables and everything in them (tests, teardown)."""
        await self._run("drop_tables", lambda: drop_schema(self._engine, self._tables), schema=False)
        self._ready = False

    # -- internals ---------------------------------------------------------

    async def _append(self, turn: TurnWrite) -> AppendResult:
        async with self._writer.begin() as conn:
            return await self._append_in(conn, turn)

    async def _append_batch(self, turns: Sequence[TurnWrite]) -> list[Outcome[AppendResult]]:
        """``turns`` in one transaction, in order (see group_commit.py).

        A turn's ``ConflictError`` or ``PermissionDeniedError`` is its own
        outcome, raised before it writes anything (on the servers, inside
        its own savepoint).
        Anything else fails the whole batch."""
        await self._ensure_schema()
        outcomes: list[Outcome[AppendResult]] = []
        if self._backend == "sqlite":
            async with self._file_lock():
                if self._trip is not None and self._trip.usable():
                    try:
                        return await self._trip.batch(lambda raw: self._sqlite_batch(raw, turns))
                    except NoThreadHook:
                        self._trip = None
                async with self._writer.begin() as conn:
                    return await conn.run_sync(lambda sync: self._sqlite_batch(SyncBatchDB(sync), turns))
        async with self._writer.begin() as conn:
            for turn in turns:
                try:
                    self._check_packet(turn)
                except StorageError as exc:
                    outcomes.append(Outcome(error=exc))
                    continue
                try:
                    # Row locks are taken as turns come: a savepoint undoes
                    # whatever a refused turn did before its checks.
                    async with conn.begin_nested():
                        outcomes.append(Outcome(value=await self._append_in(conn, turn)))
                except (ConflictError, PermissionDeniedError) as exc:
                    outcomes.append(Outcome(error=exc))
        return outcomes

    def _file_lock(self) -> AbstractAsyncContextManager[None]:
        return self._write_lock.held() if self._write_lock is not None else nullcontext()

    def _sqlite_batch(self, db: BatchDB, turns: Sequence[TurnWrite]) -> list[Outcome[AppendResult]]:
        """A SQLite batch in a handful of statements whatever its size: under
        the database's write lock nothing else changes what the batch read,
        so two reads bring every conversation row and stored turn id, the
        turns are numbered in order in memory (each seeing the ones before
        it), and the writes go in one executemany per statement. Synchronous:
        it runs whole in the driver's thread (one trip, see sqlite_trip.py),
        or in SQLAlchemy's ``run_sync``."""
        sql = self._sql
        keyed = [(digest(t.conv_uid), digest(t.turn_id), t) for t in turns]
        keys = list({k for k, _, _ in keyed})
        rows = {r[-1]: r for r in db.rows(sql.batch_rows, {"keys": keys})}
        turn_keys = list({tk for _, tk, _ in keyed})
        stored = {(r[0], r[1]) for r in db.rows(sql.batch_turns, {"turn_keys": turn_keys})}
        state: dict[str, Conversation | None] = {
            k: _conversation(rows[k]) if k in rows else None for k in keys
        }
        written: dict[tuple[str, str], TurnRecord] = {}
        creates: list[dict[str, Any]] = []
        message_rows: list[dict[str, Any]] = []
        turn_rows: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        outcomes: list[Outcome[AppendResult]] = []
        for key, turn_key, turn in keyed:
            conv = state[key]
            if conv is not None:
                try:
                    check_turn_owner(conv, turn)  # the conversation may be one this batch created
                except PermissionDeniedError as exc:
                    outcomes.append(Outcome(error=exc))
                    continue
            earlier = written.get((key, turn_key))
            if earlier is None and conv is not None and (key, turn_key) in stored:
                found = db.rows(sql.turn, {"key": key, "turn_key": turn_key})
                earlier = _turn_record(found, turn.conv_uid, turn.turn_id)
                if earlier is None:  # cannot happen under the write lock; be safe
                    raise _StartOver
            if earlier is not None:
                assert conv is not None
                outcomes.append(Outcome(value=AppendResult(conversation=conv, turn=earlier, duplicate=True)))
                continue
            last_seq = conv.message_count if conv is not None else 0
            if turn.expect_last_seq is not None and turn.expect_last_seq != last_seq:
                error = ConflictError(conflict_message(turn.conv_uid, turn.expect_last_seq, last_seq))
                outcomes.append(Outcome(error=error))
                continue
            messages = number_messages(turn, last_seq + 1)
            new = apply_turn(conv, turn)
            message_rows += _message_rows(key, messages, conv.total_tokens if conv is not None else 0)
            turn_rows.append(_turn_row(key, turn_key, turn, messages))
            if conv is None:
                creates.append({**_conversation_values(new), "conv_key": key})
            else:
                updates.append(_update_params(key, new))
            state[key] = new
            record = written[(key, turn_key)] = turn_record(turn, messages)
            outcomes.append(Outcome(value=AppendResult(conversation=new, turn=record, duplicate=False)))
        if creates:  # before the updates: a conversation created here may be updated after
            db.many(sql.create, creates)
        if message_rows:
            db.many(sql.insert_messages, message_rows)
            db.many(sql.insert_turn, turn_rows)
        if updates:
            db.many(sql.update, updates)
        return outcomes

    async def _append_in(self, conn: AsyncConnection, turn: TurnWrite) -> AppendResult:
        """One turn in the transaction ``conn`` holds. Every check that can
        refuse the turn comes before its first write."""
        sql = self._sql
        key = digest(turn.conv_uid)
        turn_key = digest(turn.turn_id)
        lock_params = {"key": key, "turn_key": turn_key}
        row = (await conn.execute(sql.lock, lock_params)).first()
        conv: Conversation | None = None
        created = False
        if row is None:
            if self._backend == "sqlite" and turn.expect_last_seq not in (None, 0):
                # Refused before the row is created (the write lock makes the
                # missing row final), so a batch is left as it was.
                raise ConflictError(conflict_message(turn.conv_uid, turn.expect_last_seq, 0))
            new = apply_turn(None, turn)
            values = _conversation_values(new)
            values["conv_key"] = key
            if not sql.created_rowcount:
                values.update(message_count=0, total_tokens=0)  # set by the update below
            result = await conn.execute(sql.create, values)
            created = sql.created_rowcount and result.rowcount == 1
            if not created:
                row = (await conn.execute(sql.lock, lock_params)).first()
                if row is None:  # deleted between the two statements
                    raise _StartOver
        if row is not None:
            # Every committed row has messages: a count of 0 is the row just created.
            conv = _conversation(row) if row[_COUNT] else None
            if conv is not None:
                check_turn_owner(conv, turn)
            if conv is not None and row[_TURN_SEQ] is not None:
                return await self._duplicate(conn, conv, turn)
        last_seq = int(row[_COUNT]) if row is not None else 0
        total_before = int(row[_TOTAL]) if row is not None else 0
        if turn.expect_last_seq is not None and turn.expect_last_seq != last_seq:
            if conv is not None:
                # ``lock`` may have read the turns table before the lock
                # was granted (PostgreSQL re-reads only the locked row):
                # look again, so a stored turn wins over the conflict.
                stored = await self._turn(conn, key, turn.conv_uid, turn.turn_id)
                if stored is not None:
                    return AppendResult(conversation=conv, turn=stored, duplicate=True)
            raise ConflictError(conflict_message(turn.conv_uid, turn.expect_last_seq, last_seq))
        messages = number_messages(turn, last_seq + 1)
        new = apply_turn(conv, turn)
        message_rows = _message_rows(key, messages, total_before)
        turn_row = _turn_row(key, turn_key, turn, messages)
        # A stored turn_id the lock's read missed (a racing duplicate)
        # fails the turn insert on its primary key: retried, and found.
        cte = sql.write_cte(len(message_rows), created=created)
        if cte is not None:
            params = {} if created else _update_params(key, new)
            for i, m in enumerate(message_rows):
                params.update({f"m{i}_{k}": v for k, v in m.items()})
            params.update({f"t_{k}": v for k, v in turn_row.items()})
            await conn.execute(cte, params)
        else:
            await conn.execute(sql.insert_messages, message_rows)
            await conn.execute(sql.insert_turn, turn_row)
            if not created:
                await conn.execute(sql.update, _update_params(key, new))
        return AppendResult(conversation=new, turn=turn_record(turn, messages), duplicate=False)

    def _turn_connection(self) -> AbstractAsyncContextManager[AsyncConnection | DriverConnection]:
        """A connection for the turn's statements, each its own transaction:
        the driver's where there is one (driver.py) and nothing listens
        to the engine's statements, else the reader's."""
        if self._driver is not None and self._driver.unobserved():
            return self._driver.connect()
        return self._reader.connect()

    async def _sqlite_context(
        self, params: dict[str, Any], *, with_turn: bool
    ) -> tuple[Sequence[Any] | None, list[Any], Sequence[Sequence[Any]] | None] | None:
        """SQLite, nothing watching the engine's statements: the ``head``
        row (None: no such conversation) and the ``tail`` rows in seq order,
        as sqlite3 reads them (JSON columns still text, decoded where used);
        with ``with_turn``, the ``turn`` statement's rows instead of the tail
        when the row says the turn is stored (else None). One trip to the
        driver's thread, in one snapshot, shared with the reads waiting with
        it (sqlite_trip.py). None elsewhere: SQLAlchemy's path."""
        trip = self._trip
        if trip is None or not trip.usable():
            return None
        sql = self._sql
        budget = params["budget"]

        def read(db: ThreadDB) -> tuple[Sequence[Any] | None, list[Any], Sequence[Sequence[Any]] | None]:
            found = db.fetch(sql.head, params)
            if not found:
                return None, [], None
            head = found[0]
            if with_turn and head[_TURN_SEQ] is not None:
                return head, [], db.rows(sql.turn, {"key": params["key"], "turn_key": params["turn_key"]})
            if budget < 0:
                return head, [], None
            bounds = {"key": params["key"], "low": head[_TOTAL] - budget, "last": head[_COUNT]}
            return head, db.fetch(sql.tail, bounds), None

        try:
            return await trip.read(read)
        except NoThreadHook:
            self._trip = None
            return None

    def _raw_tail(self, rows: Sequence[Sequence[Any]]) -> list[Message]:
        """The ``tail`` statement's rows as sqlite3 read them, already in seq order."""
        message = self._messages.message
        return [message(row, raw=True) for row in rows]

    async def _tail(
        self,
        conn: AsyncConnection | DriverConnection,
        key: str,
        rows: Sequence[Sequence[Any]],
        max_tokens: int,
    ) -> list[Message]:
        """The tail of the ``context`` rows (which hold it, or the bounds to read it by)."""
        if self._sql.joined_tail:
            return self._messages.tail(rows)
        if max_tokens < 0:
            return []
        head = rows[0]
        params = {"key": key, "low": int(head[_TOTAL]) - max_tokens, "last": int(head[_COUNT])}
        if isinstance(conn, DriverConnection):
            # Records as read are the cache's keys: a hit skips their processing.
            tail = conn.statement(self._sql.tail)
            cache = self._driver_messages
            return [cache.message(r, process=tail.process) for r in await conn.fetch(tail, params)]
        return [self._messages.message(r) for r in await conn.execute(self._sql.tail, params)]

    async def _duplicate(self, conn: AsyncConnection, conv: Conversation, turn: TurnWrite) -> AppendResult:
        stored = await self._turn(conn, digest(turn.conv_uid), turn.conv_uid, turn.turn_id)
        if stored is None:  # cannot happen under the row lock; be safe
            raise _StartOver
        return AppendResult(conversation=conv, turn=stored, duplicate=True)

    async def _turn(
        self, conn: AsyncConnection | DriverConnection, key: str, conv_uid: str, turn_id: str
    ) -> TurnRecord | None:
        params = {"key": key, "turn_key": digest(turn_id)}
        return _turn_record(await _rows(conn, self._sql.turn, params), conv_uid, turn_id)

    async def _ensure_schema(self) -> None:
        if self._ready:
            return
        async with self._schema_lock:
            if not self._ready:
                await ensure_schema(self._engine, self._tables)
                if self._backend in {"mysql", "mariadb"}:
                    async with self._engine.connect() as conn:
                        packet = (await conn.execute(text("SELECT @@max_allowed_packet"))).scalar()
                    self._max_packet = int(packet) if packet else None
                self._ready = True

    async def _run(self, what: str, op: Callable[[], Awaitable[T]], *, schema: bool = True) -> T:
        """``op`` with the schema in place, retried on contention and lost
        connections; driver errors left at the end become StorageErrors."""
        for attempt in range(1, self._retries + 1):
            try:
                if schema:
                    await self._ensure_schema()
                return await op()
            except _StartOver:
                if attempt == self._retries:
                    raise StorageError(
                        f"SQL store: {what} kept racing deletes of the conversation after {attempt} attempts"
                    ) from None
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                if classify(exc) is Kind.FATAL or attempt == self._retries:
                    raise to_storage_error(exc, what, attempt) from exc
            await asyncio.sleep(random.uniform(0, min(0.25, 0.005 * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover


async def _rows(
    conn: AsyncConnection | DriverConnection, stmt: Executable, params: dict[str, Any]
) -> Sequence[Sequence[Any]]:
    """``stmt``'s rows, through SQLAlchemy or straight on the driver."""
    if isinstance(conn, DriverConnection):
        return await conn.rows(stmt, params)
    result: Sequence[Sequence[Any]] = (await conn.execute(stmt, params)).all()
    return result


class _StartOver(Exception):
    """The operation raced a delete; running it again is correct."""


def _install_sqlite_listeners(engine: AsyncEngine, busy_timeout: float) -> None:
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_convcore_listeners", False):
        return

    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own implicit BEGIN is off; _begin below emits ours.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Any) -> None:
        # Writers take the write lock up front: a deferred transaction that
        # upgrades later can fail with SQLITE_BUSY without waiting. The
        # store's reads are single statements, each its own snapshot: no
        # BEGIN (and its worker-thread trips) for them.
        options = conn.get_execution_options()
        if options.get(READ_OPTION):
            return
        begin = "BEGIN IMMEDIATE" if options.get(WRITE_OPTION) else "BEGIN"
        adapted = conn.connection.dbapi_connection
        if hasattr(getattr(adapted, "driver_connection", None), "execute_fetchall"):
            # One trip to aiosqlite's thread (a cursor through SQLAlchemy takes three).
            adapted.run_async(lambda driver: driver.execute_fetchall(begin))
        else:
            conn.exec_driver_sql(begin)

    sync_engine._convcore_listeners = True  # type: ignore[attr-defined]


def _flag(value: str, field: str) -> bool:
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise InvalidRequestError(f"use 1/true/on or 0/false/off, not {value!r}", field=field)


def _parts_size(m: MessageDraft) -> int:
    return sum(len(p.model_dump_json()) for p in m.parts) if m.parts else 0


def _conversation_values(conv: Conversation) -> dict[str, Any]:
    return {
        "conv_uid": conv.conv_uid,
        "user_name": conv.user_name,
        "sys_code": conv.sys_code,
        "chat_mode": conv.chat_mode,
        "chat_param": conv.chat_param,
        "model": conv.model,
        "encoding": conv.encoding,
        "system": [m.model_dump() for m in conv.system],
        "created_at": conv.created_at,
        "updated_at": conv.updated_at,
        "message_count": conv.message_count,
        "total_tokens": conv.total_tokens,
    }


def _turn_values(key: str, turn_key: str, turn: TurnWrite) -> dict[str, Any]:
    """A turn row but its seqs."""
    return {
        "conv_key": key,
        "turn_key": turn_key,
        "turn_id": turn.turn_id,
        "model": turn.model,
        "prompt_tokens": turn.prompt_tokens,
        "completion_tokens": turn.completion_tokens,
        "finish_reason": turn.finish_reason,
        "created_at": turn.created_at,
        "params": turn.params,
    }


def _turn_row(key: str, turn_key: str, turn: TurnWrite, messages: Sequence[Message]) -> dict[str, Any]:
    return {**_turn_values(key, turn_key, turn), "first_seq": messages[0].seq, "last_seq": messages[-1].seq}


def _one_statement_params(key: str, turn_key: str, turn: TurnWrite) -> dict[str, Any]:
    """Parameters of ``Statements.append_one``."""
    params: dict[str, Any] = {
        "key": key,
        "turn_key": turn_key,
        "expect": -1 if turn.expect_last_seq is None else turn.expect_last_seq,
        "owner_user": turn.user_name,
        "owner_sys": turn.sys_code,
        "owned_only": turn.owned_only,
        "c_chat_mode": turn.chat_mode,
        "c_chat_param": turn.chat_param,
        "c_updated_at": turn.created_at,
    }
    if turn.model:
        params["c_model"] = turn.model
    if turn.system is not None:
        params["c_system"] = [m.model_dump() for m in turn.system]
    before = 0
    for i, draft in enumerate(turn.messages):
        row = {**draft.model_dump(), "conv_key": key, "turn_id": turn.turn_id, "created_at": turn.created_at}
        params.update({f"m{i}_{k}": v for k, v in row.items()})
        params[f"m{i}_off"] = before
        before += draft.token_count
    params["added"] = before
    params.update({f"t_{k}": v for k, v in _turn_values(key, turn_key, turn).items()})
    return params


def _update_params(key: str, conv: Conversation) -> dict[str, Any]:
    """Parameters of ``Statements.update``: what an append changes."""
    return {
        "w_key": key,
        "c_chat_mode": conv.chat_mode,
        "c_chat_param": conv.chat_param,
        "c_model": conv.model,
        "c_system": [m.model_dump() for m in conv.system],
        "c_updated_at": conv.updated_at,
        "c_message_count": conv.message_count,
        "c_total_tokens": conv.total_tokens,
    }


# Positions in rows laid out as CONV_COLUMNS (+ the turn's first seq, + MSG_COLUMNS).
_COUNT = CONV_COLUMNS.index("message_count")
_TOTAL = CONV_COLUMNS.index("total_tokens")
_TURN_SEQ = len(CONV_COLUMNS)


def _conversation(r: Sequence[Any]) -> Conversation:
    return Conversation(
        conv_uid=r[0],
        user_name=r[1],
        sys_code=r[2],
        chat_mode=r[3],
        chat_param=r[4],
        model=r[5],
        encoding=r[6],
        system=tuple(MessageDraft.model_validate(d) for d in r[7] or ()),
        created_at=r[8],
        updated_at=r[9],
        message_count=r[10],
        total_tokens=r[11],
    )


_SYSTEM = CONV_COLUMNS.index("system")


def _turn_record(rows: Sequence[Sequence[Any]], conv_uid: str, turn_id: str) -> TurnRecord | None:
    """The stored turn in the ``turn`` statement's rows (None if there are none)."""
    if not rows:
        return None
    head = rows[0]
    n = len(TURN_COLUMNS)
    return TurnRecord(
        conv_uid=conv_uid,
        turn_id=turn_id,
        model=head[0],
        prompt_tokens=head[1],
        completion_tokens=head[2],
        finish_reason=head[3],
        created_at=head[4],
        params=head[5],
        messages=tuple(decode_message(row, n) for row in rows),
    )


def _decoded_head(row: Sequence[Any]) -> list[Any]:
    """A ``context`` row read through the driver, its conversation's JSON
    decoded (what SQLAlchemy's result processing gives)."""
    out = list(row)
    if out[_SYSTEM] is not None:
        out[_SYSTEM] = json.loads(out[_SYSTEM])
    return out


def _message_rows(key: str, messages: Sequence[Message], total_before: int) -> list[dict[str, Any]]:
    rows = []
    total = total_before
    for m in messages:
        rows.append({**m.model_dump(), "conv_key": key, "cum_before": total})
        total += m.token_count
    return rows
