"""What the SQL store does beyond the contract: WAL, constraints, schema
creation and versions, index use, engine ownership, URLs, error mapping."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import pymysql
import pytest
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from convcore import ConflictError, StorageError, StorageUnavailableError, open_store
from convcore_sql import SCHEMA_VERSION, SQLStore
from convcore_sql.errors import Kind, classify
from convcore_sql.tables import digest
from convcore_sql.urls import to_async_url
from tests.helpers import draft, turn
from tests.stores import StoreFactory, unavailable
from tests.stores.sql import FACTORY_PARAMS, PG_URL, new_prefix, reachable, with_table_prefix

pytestmark = pytest.mark.anyio


@pytest.fixture(params=FACTORY_PARAMS)
async def sql_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as factory:
        try:
            yield factory
        finally:
            await factory.cleanup()


@pytest.fixture
async def sql_store(sql_factory: StoreFactory) -> AsyncIterator[SQLStore]:
    store = sql_factory.make()
    assert isinstance(store, SQLStore)
    try:
        yield store
    finally:
        await store.aclose()


async def test_sqlite_file_is_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/w.db", busy_timeout=12.5)
    try:
        await store.append_turn(turn("c", "t"))
        async with store.engine.connect() as conn:
            assert (await conn.scalar(text("PRAGMA journal_mode"))) == "wal"
            assert (await conn.scalar(text("PRAGMA busy_timeout"))) == 12_500
    finally:
        await store.aclose()
    with sqlite3.connect(tmp_path / "w.db") as raw:  # WAL is a property of the file
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_conv_seq_is_unique_in_the_database(sql_store: SQLStore) -> None:
    await sql_store.append_turn(turn("c", "t1"))
    msgs = sql_store.tables.messages
    row = {
        "conv_key": digest("c"),
        "seq": 2,
        "cum_before": 0,
        "token_count": 1,
        "role": "user",
        "content": "intruder",
        "starts_round": True,
        "turn_id": "x",
        "created_at": 0.0,
    }
    with pytest.raises(IntegrityError):
        async with sql_store.engine.begin() as conn:
            await conn.execute(insert(msgs).values(row))
    assert [m.content for m in await sql_store.read_messages("c")] == ["q", "a"]


async def test_schema_is_created_once_by_concurrent_first_users(sql_factory: StoreFactory) -> None:
    stores = [sql_factory.make() for _ in range(6)]
    try:
        results = await asyncio.gather(*(s.append_turn(turn(f"c{i}", "t")) for i, s in enumerate(stores)))
        assert all(not r.duplicate for r in results)
        first = stores[0]
        assert isinstance(first, SQLStore)
        version = first.tables.schema_version
        async with first.engine.connect() as conn:
            rows = (await conn.execute(select(version))).all()
        assert [(r.id, r.version) for r in rows] == [(1, SCHEMA_VERSION)]
    finally:
        for s in stores:
            await s.aclose()


async def test_tables_at_a_newer_schema_version_are_refused(sql_factory: StoreFactory) -> None:
    store = sql_factory.make()
    assert isinstance(store, SQLStore)
    try:
        await store.append_turn(turn("c", "t"))
        async with store.engine.begin() as conn:
            await conn.execute(update(store.tables.schema_version).values(version=SCHEMA_VERSION + 1))
    finally:
        await store.aclose()
    newer = sql_factory.make()
    try:
        with pytest.raises(StorageError, match="newer than"):
            await newer.get_conversation("c")
    finally:
        await newer.aclose()


async def test_duplicate_turn_raced_from_two_store_objects_is_stored_once(sql_factory: StoreFactory) -> None:
    a, b = sql_factory.make(), sql_factory.make()
    try:
        for i in range(5):  # a new conversation each time: creation races too
            conv = f"race-{i}"
            w = turn(conv, "same", "q", "a")
            results = await asyncio.gather(a.append_turn(w), b.append_turn(w))
            assert sorted(r.duplicate for r in results) == [False, True]
            assert results[0].turn == results[1].turn
            assert len(await a.read_messages(conv)) == 2
    finally:
        await a.aclose()
        await b.aclose()


async def test_values_round_trip_exactly(sql_store: SQLStore) -> None:
    created = 1_700_000_000.123456789
    system = (draft("system", "nul \x00 and \\0 backslash \\ 🙂"),)
    write = turn("c\\0\x00", "t\x00", "a\\\x00b", "ok", system=system, user_name="u\\0", created_at=created)
    await sql_store.append_turn(write)
    conv = await sql_store.get_conversation("c\\0\x00")
    assert conv is not None
    assert conv.created_at == created and conv.updated_at == created
    assert conv.system == system
    msgs = await sql_store.read_messages("c\\0\x00")
    assert [m.content for m in msgs] == ["a\\\x00b", "ok"]
    assert msgs[0].created_at == created
    assert [c.conv_uid for c in await sql_store.list_conversations(user_name="u\\0")] == ["c\\0\x00"]
    assert await sql_store.list_conversations(user_name="u\x00") == []
    record = await sql_store.get_turn("c\\0\x00", "t\x00")
    assert record is not None and record.messages == tuple(msgs)
    # The turn's own reads and writes (on PostgreSQL straight on the driver) agree.
    again = await sql_store.append_turn(turn("c\\0\x00", "t2\\0", "b\\0\x00", "\\", created_at=created + 1))
    assert again.conversation == await sql_store.get_conversation("c\\0\x00")
    msgs = await sql_store.read_messages("c\\0\x00")
    assert [m.content for m in msgs] == ["a\\\x00b", "ok", "b\\0\x00", "\\"]
    assert again.turn.messages == tuple(msgs[2:])
    context = await sql_store.read_context("c\\0\x00", 10**6, turn_id="not stored")
    assert context.conversation == again.conversation and context.tail == tuple(msgs)
    assert await sql_store.read_tail("c\\0\x00", 10**6) == msgs
    stored = await sql_store.read_context("c\\0\x00", 10**6, turn_id="t2\\0")
    assert stored.turn == again.turn


async def _fill(store: SQLStore, conv_uid: str, n: int, tokens: int = 10) -> None:
    """``n`` messages in one conversation, written directly (fast)."""
    await store.append_turn(turn(conv_uid, "t0", tokens=(tokens, tokens)))
    t = store.tables
    key = digest(conv_uid)
    rows = [
        {
            "conv_key": key,
            "seq": seq,
            "cum_before": (seq - 1) * tokens,
            "token_count": tokens,
            "role": "user" if seq % 2 else "assistant",
            "content": f"m{seq}",
            "starts_round": bool(seq % 2),
            "turn_id": f"t{(seq - 1) // 2}",
            "created_at": 1.0,
        }
        for seq in range(3, n + 1)
    ]
    async with store.engine.begin() as conn:
        for i in range(0, len(rows), 1000):
            await conn.execute(insert(t.messages), rows[i : i + 1000])
        await conn.execute(
            update(t.conversations)
            .where(t.conversations.c.conv_key == key)
            .values(message_count=n, total_tokens=n * tokens)
        )


async def test_read_tail_reads_only_the_rows_it_returns(sql_store: SQLStore) -> None:
    """The tail read_context and read_tail run (joined to the conversation
    row in one SELECT; on PostgreSQL a second statement) is one range of
    ix_msg_tail holding exactly the returned rows."""
    n = 20_000
    await _fill(sql_store, "long", n)
    await _fill(sql_store, "other", 2_000)
    tail = await sql_store.read_tail("long", 55)
    assert [m.seq for m in tail] == [n - 4, n - 3, n - 2, n - 1, n]
    ctx = await sql_store.read_context("long", 55, turn_id="not-stored")
    assert ctx.tail == tuple(tail) and ctx.turn is None
    backend = sql_store.engine.dialect.name
    sql = sql_store._sql
    values = {"key": digest("long"), "turn_key": digest("not-stored"), "budget": 55}
    msgs = sql_store.tables.messages.name
    async with sql_store.engine.connect() as conn:

        def literal(stmt: Any, params: dict[str, Any]) -> str:
            compiled = stmt.params(params).compile(
                conn.sync_connection, compile_kwargs={"literal_binds": True}
            )
            return str(compiled)

        if backend == "postgresql":
            # The tail is a second statement, bounded by values (see statements.py).
            bounds = {"key": digest("long"), "low": n * 10 - 55, "last": n}
            await conn.execute(text(f"ANALYZE {msgs}"))
            raw = await conn.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {literal(sql.tail, bounds)}"))
            plan = raw.scalar_one()
            scan = _find_scan(plan[0]["Plan"] if isinstance(plan, list) else json.loads(plan)[0]["Plan"])
            assert scan["Index Name"].endswith("ix_msg_tail"), scan
            assert scan["Actual Rows"] == len(tail), "the index range holds exactly the window"
        elif backend == "sqlite":
            compiled = sql.context.compile(conn.sync_connection)  # as run: with parameters
            params = tuple(values[name] for name in compiled.positiontup or ())
            rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
            plan = " ".join(str(r[-1]) for r in rows)
            assert "ix_msg_tail (conv_key=? AND cum_before>?)" in plan, plan
            assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan
        else:
            await conn.execute(text(f"ANALYZE TABLE {msgs}"))
            found = await conn.execute(text(f"ANALYZE FORMAT=JSON {literal(sql.context, values)}"))
            table = _find_table(json.loads(found.scalar_one()), msgs)
            assert table["key"].endswith("ix_msg_tail"), table
            assert table["r_rows"] == len(tail), "the index range holds exactly the window"


def _find_scan(node: dict[str, Any]) -> dict[str, Any]:
    if "Index Name" in node and node.get("Relation Name", "").endswith("messages"):
        return node
    for child in node.get("Plans", []):
        found = _find_scan(child)
        if found:
            return found
    return {}


def _find_table(node: Any, name: str) -> dict[str, Any]:
    if isinstance(node, dict):
        if node.get("table_name") == name:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return {}
    for child in children:
        found = _find_table(child, name)
        if found:
            return found
    return {}


async def test_listing_newest_first_reads_an_index_in_order(tmp_path: Path) -> None:
    # On SQLite: the server planners rightly prefer a scan on a table this small.
    store = open_store(f"sqlite:///{tmp_path}/l.db")
    try:
        for i in range(30):
            await store.append_turn(turn(f"c{i}", "t", user_name=f"u{i % 3}", sys_code=f"s{i % 5}"))
        conv = store.tables.conversations
        for column, index in [(conv.c.user_name, "ix_conv_user"), (conv.c.sys_code, "ix_conv_sys")]:
            stmt = (
                select(conv)
                .where(column == "u1" if index == "ix_conv_user" else column == "s1")
                .order_by(conv.c.updated_at.desc(), conv.c.conv_key.desc())
                .limit(5)
            )
            async with store.engine.connect() as conn:
                compiled = str(stmt.compile(conn.sync_connection, compile_kwargs={"literal_binds": True}))
                rows = await conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))
                plan = " ".join(str(r[-1]) for r in rows)
            assert index in plan and "TEMP B-TREE" not in plan, plan
    finally:
        await store.aclose()


async def test_an_engine_passed_in_stays_open(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/e.db")
    try:
        store = SQLStore(engine, table_prefix="cct_mine_")
        await store.append_turn(turn("c", "t"))
        await store.aclose()
        async with engine.connect() as conn:
            count = await conn.scalar(select(func.count()).select_from(store.tables.messages))
        assert count == 2
        assert engine.pool.checkedin() >= 1, "the caller's pool was not disposed"
    finally:
        await engine.dispose()


async def test_a_store_from_a_url_disposes_its_engine(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/own.db")
    await store.append_turn(turn("c", "t"))
    assert store.engine.pool.checkedin() >= 1
    await store.aclose()
    assert store.engine.pool.checkedin() == 0


def test_nothing_connects_at_construction() -> None:
    store = open_store("postgresql://nobody@127.0.0.1:1/none")
    assert store.engine.pool.checkedin() == 0 and store.engine.pool.checkedout() == 0


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite:///:memory:", "sqlite+aiosqlite"),
        ("postgresql://user@127.0.0.1:5432/test", "postgresql+asyncpg"),
        ("postgres://user@127.0.0.1/test", "postgresql+asyncpg"),
        ("postgresql+asyncpg://user@127.0.0.1/test", "postgresql+asyncpg"),
        ("mysql://root@127.0.0.1:3306/test", "mysql+aiomysql"),
        ("mariadb://root@127.0.0.1:3306/test", "mariadb+aiomysql"),
        ("mysql+aiomysql://root@127.0.0.1/test", "mysql+aiomysql"),
    ],
)
def test_urls_get_an_async_driver(url: str, driver: str) -> None:
    parsed = to_async_url(url)
    assert parsed.drivername == driver
    if parsed.get_backend_name() in {"mysql", "mariadb"}:
        assert parsed.query["charset"] == "utf8mb4"


async def test_open_store_and_memory_sqlite(tmp_path: Path) -> None:
    store = open_store("sqlite:///:memory:")
    try:
        assert isinstance(store, SQLStore)
        await asyncio.gather(*(store.append_turn(turn("c", f"t{i}", f"q{i}", f"re:q{i}")) for i in range(20)))
        assert [m.seq for m in await store.read_messages("c")] == list(range(1, 41))
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://postgres@127.0.0.1:1/test", id="postgresql"),
        pytest.param("mysql://root@127.0.0.1:1/test", id="mysql"),
        pytest.param("sqlite:////nonexistent-dir/sub/x.db", id="sqlite"),
    ],
)
async def test_an_unreachable_database_is_storage_unavailable(url: str) -> None:
    store = open_store(url, retries=2)
    try:
        with pytest.raises(StorageUnavailableError) as info:
            await store.append_turn(turn("c", "t"))
        assert info.value.__cause__ is not None
    finally:
        await store.aclose()
    await _aiosqlite_threads_stopped()


async def _aiosqlite_threads_stopped() -> None:
    """aiosqlite stops a connection that failed to open by queueing a close
    for its worker thread and not awaiting it; if the event loop closes first
    the thread raises "Event loop is closed" (an unhandled-thread warning,
    an error under filterwarnings). Wait for those threads to finish."""
    with anyio.fail_after(5):
        while any("_connection_worker_thread" in t.name for t in threading.enumerate()):
            await asyncio.sleep(0.01)


async def test_a_bad_table_prefix_is_refused() -> None:
    from convcore import InvalidRequestError

    for prefix in ["", "1abc", "a-b", "x;drop", "p" * 40]:
        with pytest.raises(InvalidRequestError):
            open_store("sqlite:///:memory:", table_prefix=prefix)
    assert new_prefix().startswith("cct_")


def _sqlite_error(code: int) -> sqlite3.Error:
    exc = sqlite3.OperationalError("x")
    exc.sqlite_errorcode = code
    return exc


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("orig", "kind"),
    [
        (_PgError("40001"), Kind.CONTENTION),
        (_PgError("40P01"), Kind.CONTENTION),
        (_PgError("23505"), Kind.CONTENTION),
        (_PgError("57P01"), Kind.UNAVAILABLE),
        (_PgError("08006"), Kind.UNAVAILABLE),
        (_PgError("42P01"), Kind.FATAL),
        (pymysql.err.OperationalError(1213, "Deadlock found"), Kind.CONTENTION),
        (pymysql.err.OperationalError(1205, "Lock wait timeout"), Kind.CONTENTION),
        (pymysql.err.OperationalError(2013, "Lost connection"), Kind.UNAVAILABLE),
        (pymysql.err.ProgrammingError(1146, "no such table"), Kind.FATAL),
        (_sqlite_error(sqlite3.SQLITE_BUSY), Kind.CONTENTION),
        (_sqlite_error(sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY), Kind.CONTENTION),
        (_sqlite_error(sqlite3.SQLITE_CANTOPEN), Kind.UNAVAILABLE),
        (_sqlite_error(sqlite3.SQLITE_ERROR), Kind.FATAL),
        (ConnectionRefusedError(111, "refused"), Kind.UNAVAILABLE),
    ],
)
def test_driver_errors_are_classified(orig: Exception, kind: Kind) -> None:
    assert classify(OperationalError("stmt", {}, orig)) is kind


async def test_table_prefix_can_come_with_the_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}?table_prefix=cct_urlpfx_"
    store = open_store(url)
    try:
        await store.append_turn(turn("c", "t"))
        assert store.tables.conversations.name.startswith("cct_urlpfx_")  # type: ignore[attr-defined]
        assert len(await store.read_messages("c")) == 2
    finally:
        await store.aclose()


async def test_a_duplicate_raced_on_an_existing_conversation_is_stored_once(
    sql_factory: StoreFactory,
) -> None:
    """The lock's read of the turns table may predate the lock (PostgreSQL
    re-reads only the locked row, MySQL's subquery is not a locking read):
    a turn stored by the writer it waited for still comes back as the
    duplicate, before expect_last_seq, and is never stored twice."""
    a, b = sql_factory.make(), sql_factory.make()
    try:
        for i in range(10):
            conv = f"exp-{i}"
            await a.append_turn(turn(conv, "first"))
            w = turn(conv, "same", "q", "a", expect_last_seq=2 if i % 2 else None)
            results = await asyncio.gather(a.append_turn(w), b.append_turn(w))
            assert sorted(r.duplicate for r in results) == [False, True]
            assert results[0].turn == results[1].turn
            assert [m.seq for m in await b.read_messages(conv)] == [1, 2, 3, 4]
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.postgres
@pytest.mark.parametrize("watched", [False, True], ids=["on-the-driver", "with-cursor-listeners"])
async def test_postgresql_appends_to_an_existing_conversation_in_one_statement(watched: bool) -> None:
    """Lock, checks, seqs, inserts and update in one statement outside any
    transaction: one round trip, where BEGIN, a lock, the writes and COMMIT
    took four. A new conversation still takes the transaction that creates
    it; a duplicate and a refused turn answer as before. With listeners on
    the engine's statements (tracing, logging) the statement goes through
    SQLAlchemy, so they see it."""
    if not reachable(PG_URL):
        unavailable(f"no PostgreSQL at {PG_URL}")
    store = SQLStore.from_url(with_table_prefix(PG_URL, new_prefix()), group_commit=False)
    seen: list[tuple[str, str]] = []

    def before(conn: Any, cursor: Any, sql: str, *rest: Any) -> None:
        seen.append(("sqlalchemy", sql.lstrip().split()[0].upper()))

    def begun(conn: Any) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            seen.append(("sqlalchemy", "BEGIN"))

    def logged(query: Any) -> None:  # what runs on asyncpg itself, SQLAlchemy bypassed
        seen.append(("driver", query.query.lstrip().split()[0].upper()))

    def checkout(dbapi_conn: Any, *rest: Any) -> None:
        dbapi_conn.driver_connection.add_query_logger(logged)  # a set: added once

    try:
        await store.append_turn(turn("c", "t0"))  # creates the conversation
        if watched:
            event.listen(store.engine.sync_engine, "before_cursor_execute", before)
        event.listen(store.engine.sync_engine, "begin", begun)
        event.listen(store.engine.sync_engine.pool, "checkout", checkout)
        result = await store.append_turn(turn("c", "t1", system=(draft("system", "be brief"),)))
        await asyncio.sleep(0)  # asyncpg calls its query loggers soon, not at once
        assert seen == [("sqlalchemy" if watched else "driver", "WITH")]
        assert [m.seq for m in result.turn.messages] == [3, 4]
        assert result.conversation.message_count == 4
        assert [m.content for m in result.conversation.system] == ["be brief"]
        assert result.conversation == await store.get_conversation("c")
        again = await store.append_turn(turn("c", "t1"))
        assert again.duplicate and again.turn == result.turn
        with pytest.raises(ConflictError):
            await store.append_turn(turn("c", "t2", expect_last_seq=2))
        assert [m.seq for m in await store.read_messages("c")] == [1, 2, 3, 4]
    finally:
        if watched:
            event.remove(store.engine.sync_engine, "before_cursor_execute", before)
        event.remove(store.engine.sync_engine, "begin", begun)
        event.remove(store.engine.sync_engine.pool, "checkout", checkout)
        await store.drop_tables()
        await store.aclose()
