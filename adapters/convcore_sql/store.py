"""The SQL store: conversations in SQLite, PostgreSQL or MySQL/MariaDB.

An append is one transaction that first locks the conversation's row (creating
it if absent), so appends to one conversation serialise while others run in
parallel:

- PostgreSQL: ``SELECT … FOR UPDATE``; a missing row is created with
  ``INSERT … ON CONFLICT DO NOTHING`` and then locked.
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
when a commit's outcome was unknown.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Executable, Row, Select, and_, delete, event, insert, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from convcore.errors import ConflictError, InvalidRequestError, MissingDependencyError
from convcore.models import (
    AppendResult,
    Conversation,
    Message,
    MessageDraft,
    TurnContext,
    TurnRecord,
    TurnWrite,
)
from convcore.storekit import apply_turn, conflict_message, number_messages, turn_record

from .errors import Kind, classify, is_driver_error, to_storage_error
from .schema import WRITE_OPTION, drop_schema, ensure_schema
from .tables import Tables, bind_tables, digest
from .urls import engine_options, to_async_url

__all__ = ["SQLStore"]

T = TypeVar("T")

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_NAME_LIMIT = 256  # the width of user_name / sys_code columns


class SQLStore:
    """Conversations in SQL tables named ``<table_prefix>…``.

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
        self._schema_lock = asyncio.Lock()
        if self._backend == "sqlite":
            _install_sqlite_listeners(engine, busy_timeout)

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        table_prefix: str = "convcore_",
        retries: int = 8,
        busy_timeout: float = 30.0,
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
            if table_prefix == "convcore_":
                table_prefix = in_url if isinstance(in_url, str) else in_url[-1]
        try:
            engine = create_async_engine(async_url, **engine_options(async_url, options))
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(f"the {async_url.drivername} store", "sql") from exc
        store = cls(engine, table_prefix=table_prefix, retries=retries, busy_timeout=busy_timeout)
        store._owns_engine = True
        return store

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def tables(self) -> Tables:
        return self._tables

    async def aclose(self) -> None:
        if self._owns_engine:
            await self._engine.dispose()

    # -- reads -------------------------------------------------------------

    async def get_conversation(self, conv_uid: str) -> Conversation | None:
        conv = self._tables.conversations
        stmt = select(conv).where(conv.c.conv_key == digest(conv_uid))

        async def op() -> Conversation | None:
            async with self._reading() as conn:
                row = (await conn.execute(stmt)).first()
            return _conversation(row) if row is not None else None

        return await self._run("get_conversation", op)

    async def get_turn(self, conv_uid: str, turn_id: str) -> TurnRecord | None:
        key = digest(conv_uid)

        async def op() -> TurnRecord | None:
            async with self._reading() as conn:
                return await self._turn(conn, key, conv_uid, turn_id)

        return await self._run("get_turn", op)

    async def read_tail(self, conv_uid: str, max_tokens: int) -> list[Message]:
        if max_tokens < 0:
            return []
        conv, msgs = self._tables.conversations, self._tables.messages
        key = digest(conv_uid)
        head = select(conv.c.total_tokens, conv.c.message_count).where(conv.c.conv_key == key)

        async def op() -> list[Message]:
            async with self._reading() as conn:
                row = (await conn.execute(head)).first()
                if row is None:
                    return []
                stmt = self._tail_statement(key, int(row.total_tokens) - max_tokens, int(row.message_count))
                return [_message(r._mapping, msgs.c) for r in await conn.execute(stmt)]

        return await self._run("read_tail", op)

    async def read_context(
        self, conv_uid: str, max_tokens: int, *, turn_id: str | None = None
    ) -> TurnContext:
        """One connection, one read transaction: the conversation row, the
        turn if asked for, and the tail bounded by the row's totals."""
        conv, msgs = self._tables.conversations, self._tables.messages
        key = digest(conv_uid)
        stmt = select(conv).where(conv.c.conv_key == key)

        async def op() -> TurnContext:
            async with self._reading() as conn:
                row = (await conn.execute(stmt)).first()
                if row is None:
                    return TurnContext(conversation=None)
                found = _conversation(row)
                turn = await self._turn(conn, key, conv_uid, turn_id) if turn_id is not None else None
                tail: list[Message] = []
                if max_tokens >= 0 and turn is None:
                    tail_stmt = self._tail_statement(
                        key, found.total_tokens - max_tokens, found.message_count
                    )
                    tail = [_message(r._mapping, msgs.c) for r in await conn.execute(tail_stmt)]
            return TurnContext(conversation=found, tail=tuple(tail), turn=turn)

        return await self._run("read_context", op)

    async def read_messages(
        self, conv_uid: str, *, start_seq: int = 1, limit: int | None = None
    ) -> list[Message]:
        if limit is not None and limit <= 0:
            return []
        msgs = self._tables.messages
        stmt = (
            select(msgs)
            .where(msgs.c.conv_key == digest(conv_uid), msgs.c.seq >= start_seq)
            .order_by(msgs.c.seq)
            .limit(limit)
        )
        return await self._read_messages("read_messages", stmt)

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
        stmt = select(conv)
        if user_name is not None:
            stmt = stmt.where(conv.c.user_name == user_name)
        if sys_code is not None:
            stmt = stmt.where(conv.c.sys_code == sys_code)
        stmt = stmt.order_by(conv.c.updated_at.desc(), conv.c.conv_key.desc()).offset(max(offset, 0))
        stmt = stmt.limit(limit)

        async def op() -> list[Conversation]:
            async with self._reading() as conn:
                return [_conversation(row) for row in await conn.execute(stmt)]

        return await self._run("list_conversations", op)

    # -- writes ------------------------------------------------------------

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        for field in ("user_name", "sys_code"):
            value = getattr(turn, field)
            if value is not None and len(value) > _NAME_LIMIT:
                raise InvalidRequestError(f"longer than {_NAME_LIMIT} characters", field=field)
        return await self._run("append_turn", lambda: self._append(turn))

    async def delete_conversation(self, conv_uid: str) -> bool:
        t = self._tables
        key = digest(conv_uid)

        async def op() -> bool:
            async with self._writing() as conn:
                if await self._lock_conversation(conn, key) is None:
                    return False
                await conn.execute(delete(t.messages).where(t.messages.c.conv_key == key))
                await conn.execute(delete(t.turns).where(t.turns.c.conv_key == key))
                await conn.execute(delete(t.conversations).where(t.conversations.c.conv_key == key))
                return True

        return await self._run("delete_conversation", op)

    async def drop_tables(self) -> None:
        """Drop this store's tables and everything in them (tests, teardown)."""
        await self._run("drop_tables", lambda: drop_schema(self._engine, self._tables), schema=False)
        self._ready = False

    # -- internals ---------------------------------------------------------

    async def _append(self, turn: TurnWrite) -> AppendResult:
        t = self._tables
        key = digest(turn.conv_uid)
        async with self._writing() as conn:
            row = await self._lock_conversation(conn, key)
            if row is None:
                await conn.execute(self._create_conversation(key, turn))
                row = await self._lock_conversation(conn, key)
                if row is None:  # deleted between the two statements
                    raise _StartOver
            # Every committed row has messages: a count of 0 is the row just created.
            conv = _conversation(row) if row.message_count else None
            if conv is not None:
                stored = await self._turn(conn, key, turn.conv_uid, turn.turn_id)
                if stored is not None:
                    return AppendResult(conversation=conv, turn=stored, duplicate=True)
            last_seq = int(row.message_count)
            if turn.expect_last_seq is not None and turn.expect_last_seq != last_seq:
                raise ConflictError(conflict_message(turn.conv_uid, turn.expect_last_seq, last_seq))
            messages = number_messages(turn, last_seq + 1)
            new = apply_turn(conv, turn)
            await conn.execute(insert(t.messages), _message_rows(key, messages, int(row.total_tokens)))
            await conn.execute(
                insert(t.turns).values(
                    conv_key=key,
                    turn_key=digest(turn.turn_id),
                    turn_id=turn.turn_id,
                    model=turn.model,
                    prompt_tokens=turn.prompt_tokens,
                    completion_tokens=turn.completion_tokens,
                    finish_reason=turn.finish_reason,
                    created_at=turn.created_at,
                    first_seq=messages[0].seq,
                    last_seq=messages[-1].seq,
                )
            )
            await conn.execute(
                update(t.conversations)
                .where(t.conversations.c.conv_key == key)
                .values(**_conversation_values(new))
            )
        return AppendResult(conversation=new, turn=turn_record(turn, messages), duplicate=False)

    def _tail_statement(self, key: str, lowest_cum_before: int, last_seq: int) -> Select[Any]:
        """Messages up to ``last_seq`` with at least ``lowest_cum_before``
        tokens before them: one range of the (conv_key, cum_before, seq) index,
        already in seq order, so the rows read are the rows returned. The
        bound is a plain value (not a subquery) so planners can see how
        narrow the range is; ``last_seq`` keeps out messages appended since
        the conversation row was read."""
        msgs = self._tables.messages
        return (
            select(msgs)
            .where(
                msgs.c.conv_key == key,
                msgs.c.cum_before >= lowest_cum_before,
                msgs.c.seq <= last_seq,
            )
            .order_by(msgs.c.cum_before, msgs.c.seq)
        )

    def _create_conversation(self, key: str, turn: TurnWrite) -> Executable:
        values = _conversation_values(apply_turn(None, turn))
        values.update(conv_key=key, message_count=0, total_tokens=0)
        table = self._tables.conversations
        if self._backend == "postgresql":
            return postgresql.insert(table).values(values).on_conflict_do_nothing(index_elements=["conv_key"])
        if self._backend == "sqlite":
            return sqlite.insert(table).values(values).on_conflict_do_nothing()
        if self._backend in {"mysql", "mariadb"}:
            stmt = mysql.insert(table).values(values)
            # A no-op update still takes the row lock, so creators queue.
            return stmt.on_duplicate_key_update(conv_key=stmt.inserted.conv_key)
        return insert(table).values(values)  # a duplicate key is retried

    async def _lock_conversation(self, conn: AsyncConnection, key: str) -> Row[Any] | None:
        conv = self._tables.conversations
        stmt = select(conv).where(conv.c.conv_key == key).with_for_update()
        return (await conn.execute(stmt)).first()

    async def _turn(self, conn: AsyncConnection, key: str, conv_uid: str, turn_id: str) -> TurnRecord | None:
        turns, msgs = self._tables.turns, self._tables.messages
        stmt = (
            select(turns, msgs)
            .join(
                msgs,
                and_(
                    msgs.c.conv_key == turns.c.conv_key,
                    msgs.c.seq >= turns.c.first_seq,
                    msgs.c.seq <= turns.c.last_seq,
                ),
            )
            .where(turns.c.conv_key == key, turns.c.turn_key == digest(turn_id))
            .order_by(msgs.c.seq)
        )
        rows = (await conn.execute(stmt)).all()
        if not rows:
            return None
        head = rows[0]._mapping
        return TurnRecord(
            conv_uid=conv_uid,
            turn_id=turn_id,
            model=head[turns.c.model],
            prompt_tokens=head[turns.c.prompt_tokens],
            completion_tokens=head[turns.c.completion_tokens],
            finish_reason=head[turns.c.finish_reason],
            created_at=head[turns.c.created_at],
            messages=tuple(_message(row._mapping, msgs.c) for row in rows),
        )

    async def _read_messages(self, what: str, stmt: Executable) -> list[Message]:
        msgs = self._tables.messages

        async def op() -> list[Message]:
            async with self._reading() as conn:
                return [_message(row._mapping, msgs.c) for row in await conn.execute(stmt)]

        return await self._run(what, op)

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if self._backend == "postgresql":
                # One statement needs no transaction: skip BEGIN/ROLLBACK trips.
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if self._backend == "sqlite":
                await conn.execution_options(**{WRITE_OPTION: True})
            async with conn.begin():
                yield conn

    async def _ensure_schema(self) -> None:
        if self._ready:
            return
        async with self._schema_lock:
            if not self._ready:
                await ensure_schema(self._engine, self._tables)
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
                pass
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                if classify(exc) is Kind.FATAL or attempt == self._retries:
                    raise to_storage_error(exc, what, attempt) from exc
            await asyncio.sleep(random.uniform(0, min(0.25, 0.005 * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover


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
        # upgrades later can fail with SQLITE_BUSY without waiting.
        immediate = conn.get_execution_options().get(WRITE_OPTION)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    sync_engine._convcore_listeners = True  # type: ignore[attr-defined]


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


def _conversation(row: Row[Any]) -> Conversation:
    m = row._mapping
    return Conversation(
        conv_uid=m["conv_uid"],
        user_name=m["user_name"],
        sys_code=m["sys_code"],
        chat_mode=m["chat_mode"],
        chat_param=m["chat_param"],
        model=m["model"],
        encoding=m["encoding"],
        system=tuple(MessageDraft.model_validate(d) for d in m["system"] or ()),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        message_count=m["message_count"],
        total_tokens=m["total_tokens"],
    )


def _message_rows(key: str, messages: Sequence[Message], total_before: int) -> list[dict[str, Any]]:
    rows = []
    total = total_before
    for m in messages:
        rows.append({**m.model_dump(), "conv_key": key, "cum_before": total})
        total += m.token_count
    return rows


def _message(m: Any, c: Any) -> Message:
    return Message(
        role=m[c.role],
        content=m[c.content],
        name=m[c.name],
        tool_call_id=m[c.tool_call_id],
        token_count=m[c.token_count],
        starts_round=bool(m[c.starts_round]),
        seq=m[c.seq],
        turn_id=m[c.turn_id],
        created_at=m[c.created_at],
    )
