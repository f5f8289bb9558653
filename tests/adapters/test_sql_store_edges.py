"""SQLStore at its edges (exact name collation and its migration,
the PostgreSQL one-statement write on both sides of its size limit, the
URL's table prefix against the keyword, delete racing append, retries
that run out). Server tables are under ``cct_rev_<hex>_`` and dropped."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from convcore import FunctionCall, StorageError, ToolCall, TurnWrite, open_store
from convcore.content import ImagePart, ImageURL
from convcore_sql import SQLStore
from convcore_sql.schema import SCHEMA_VERSION
from convcore_sql.statements import CTE_MESSAGES
from tests.helpers import draft, turn
from tests.stores import unavailable
from tests.stores.sql import MARIADB_URL, PG_URL, reachable

pytestmark = pytest.mark.anyio

URLS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(PG_URL, id="postgresql", marks=pytest.mark.postgres),
    pytest.param(MARIADB_URL, id="mariadb", marks=pytest.mark.mysql),
]


@pytest.fixture(params=URLS)
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    """A factory of stores on one fresh namespace (``cct_rev_<hex>_`` tables)."""
    url: str = request.param
    if url == "sqlite":
        url = f"sqlite:///{tmp_path}/rev.db"
    elif not reachable(url):
        unavailable(f"{url} is not reachable")
    prefix = f"cct_rev_{uuid.uuid4().hex[:10]}_"
    made: list[SQLStore] = []

    def factory() -> SQLStore:
        store = open_store(url, table_prefix=prefix, pool_size=3, max_overflow=3)
        made.append(store)
        return store

    yield factory
    cleanup = open_store(url, table_prefix=prefix)
    try:
        await cleanup.drop_tables()
    finally:
        await cleanup.aclose()
        for s in made:
            await s.aclose()


def _turn(conv_uid: str, turn_id: str, n: int, **kw: object) -> TurnWrite:
    return TurnWrite(
        conv_uid=conv_uid,
        turn_id=turn_id,
        messages=tuple(
            draft("user" if i % 2 == 0 else "assistant", f"{turn_id}/{i}", i + 1, starts_round=i % 2 == 0)
            for i in range(n)
        ),
        encoding="cl100k_base",
        model="m",
        prompt_tokens=3,
        completion_tokens=4,
        created_at=time.time(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("n", [1, CTE_MESSAGES - 1, CTE_MESSAGES, CTE_MESSAGES + 1, 3 * CTE_MESSAGES])
async def test_both_sides_of_the_one_statement_write(make: object, n: int) -> None:
    """PostgreSQL writes up to CTE_MESSAGES messages in one statement and
    larger turns another way: creating and appending, both must agree."""
    store = make()  # type: ignore[operator]
    created = await store.append_turn(_turn("c", "a", n))
    appended = await store.append_turn(_turn("c", "b", n, expect_last_seq=n))
    assert [m.seq for m in created.turn.messages] == list(range(1, n + 1))
    assert [m.seq for m in appended.turn.messages] == list(range(n + 1, 2 * n + 1))
    per_turn = n * (n + 1) // 2
    conv = await store.get_conversation("c")
    assert conv is not None and (conv.message_count, conv.total_tokens) == (2 * n, 2 * per_turn)
    assert conv == appended.conversation
    assert await store.get_turn("c", "a") == created.turn
    assert await store.get_turn("c", "b") == appended.turn
    # cum_before is right on every row: each budget gives the exact suffix.
    msgs = await store.read_messages("c")
    assert list(created.turn.messages + appended.turn.messages) == msgs
    for budget in (0, 1, n, per_turn, per_turn + 1, 2 * per_turn):
        tail = await store.read_tail("c", budget)
        assert sum(m.token_count for m in tail) <= budget
        assert tail == msgs[len(msgs) - len(tail) :]
        if len(tail) < len(msgs):
            assert sum(m.token_count for m in msgs[len(msgs) - len(tail) - 1 :]) > budget


async def test_old_tables_are_upgraded_to_exact_names(make: object) -> None:
    """Tables at version 1 (MySQL/MariaDB: names in the server's
    case-insensitive collation) are upgraded on first use."""
    first = make()  # type: ignore[operator]
    for i, name in enumerate(["ann", "ANN", "ann "]):
        await first.append_turn(turn(f"c{i}", "t", user_name=name, sys_code=name))
    conv = first.tables.conversations.name
    async with first.engine.begin() as conn:
        if conn.dialect.name in {"mysql", "mariadb"}:
            await conn.execute(
                text(
                    f"ALTER TABLE {conv} MODIFY user_name VARCHAR(256) COLLATE utf8mb4_general_ci NULL, "
                    "MODIFY sys_code VARCHAR(256) COLLATE utf8mb4_general_ci NULL"
                )
            )
        await conn.execute(update(first.tables.schema_version).values(version=1))
    later = make()  # type: ignore[operator]
    assert [c.conv_uid for c in await later.list_conversations(user_name="ann")] == ["c0"]
    assert [c.conv_uid for c in await later.list_conversations(sys_code="ANN")] == ["c1"]
    assert [c.conv_uid for c in await later.list_conversations(user_name="ann ", sys_code="ann ")] == ["c2"]
    async with later.engine.connect() as conn:
        version = await conn.scalar(select(later.tables.schema_version.c.version))
    assert version == SCHEMA_VERSION


async def test_tables_without_tool_calls_are_upgraded(make: object) -> None:
    """Tables at version 3 have no tool_calls column: first use adds it, and
    the messages already stored read back with none."""
    first = make()  # type: ignore[operator]
    await first.append_turn(turn("c", "t1"))
    msgs = first.tables.messages.name
    async with first.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE {msgs} DROP COLUMN tool_calls"))
        await conn.execute(update(first.tables.schema_version).values(version=3))
    later = make()  # type: ignore[operator]
    calls = (ToolCall(id="call_1", function=FunctionCall(name="f", arguments="{}")),)
    asked = turn("c", "t2", "again", "")
    reply = asked.messages[1].model_copy(update={"tool_calls": calls})
    await later.append_turn(asked.model_copy(update={"messages": (asked.messages[0], reply)}))
    assert [m.tool_calls for m in await later.read_messages("c")] == [None, None, None, calls]


async def test_tables_at_version_3_gain_parts_and_params(make: object) -> None:
    """Tables written before messages kept content parts are upgraded on
    first use: their rows read as text messages, new rows keep parts."""
    first = make()  # type: ignore[operator]
    await first.append_turn(turn("old", "t"))
    async with first.engine.begin() as conn:
        for table, column in ((first.tables.messages, "parts"), (first.tables.turns, "params")):
            await conn.execute(text(f"ALTER TABLE {table.name} DROP COLUMN {column}"))
        await conn.execute(update(first.tables.schema_version).values(version=3))
    later = make()  # type: ignore[operator]
    old = await later.get_turn("old", "t")
    assert old is not None and old.params is None and all(m.parts is None for m in old.messages)
    part = ImagePart(type="image_url", image_url=ImageURL(url="https://example.com/a.png"))
    question = draft("user", "look", starts_round=True).model_copy(update={"parts": (part,)})
    write = turn("new", "t").model_copy(
        update={"messages": (question, draft("assistant", "ok")), "params": {"seed": 1}}
    )
    await later.append_turn(write)
    new = await later.get_turn("new", "t")
    assert new is not None and new.params == {"seed": 1} and new.messages[0].parts == (part,)
    async with later.engine.connect() as conn:
        assert await conn.scalar(select(later.tables.schema_version.c.version)) == SCHEMA_VERSION


async def test_delete_racing_appends_leaves_whole_conversations(make: object) -> None:
    """No orphaned rows, no half conversation: after any interleaving the
    conversation is absent or gapless from 1 with matching totals."""
    a, b = make(), make()  # type: ignore[operator]
    for round_ in range(6):
        conv = f"d{round_}"
        await a.append_turn(turn(conv, "t0"))
        ops = [a.append_turn(turn(conv, f"t{i}")) for i in range(1, 6)]
        ops.insert(round_ % 5, b.delete_conversation(conv))
        await asyncio.gather(*ops)
        msgs = await a.read_messages(conv)
        found = await a.get_conversation(conv)
        if found is None:
            assert msgs == []
            continue
        assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))
        assert found.message_count == len(msgs)
        assert found.total_tokens == sum(m.token_count for m in msgs)
        for m in msgs:
            stored = await a.get_turn(conv, m.turn_id)
            assert stored is not None and m in stored.messages
    # Rows of deleted conversations are all gone: every message belongs to a live one.
    t = a.tables
    async with a.engine.connect() as conn:
        orphans = await conn.scalar(
            select(text("count(*)"))
            .select_from(t.messages)
            .where(~t.messages.c.conv_key.in_(select(t.conversations.c.conv_key)))
        )
        stray_turns = await conn.scalar(
            select(text("count(*)"))
            .select_from(t.turns)
            .where(~t.turns.c.conv_key.in_(select(t.conversations.c.conv_key)))
        )
    assert (orphans, stray_turns) == (0, 0)


async def test_long_ids_and_names_round_trip(make: object) -> None:
    store = make()  # type: ignore[operator]
    uid, tid, name = "会" * 1024, "t" * 5000 + "\x00\\", "ü" * 256
    result = await store.append_turn(turn(uid, tid, "\\0 \x00 \\\\", user_name=name, sys_code="\\\x00"))
    assert (await store.append_turn(turn(uid, tid, user_name=name))).duplicate
    assert await store.get_turn(uid, tid) == result.turn
    listed = await store.list_conversations(user_name=name, sys_code="\\\x00")
    assert [c.conv_uid for c in listed] == [uid]
    assert (await store.read_messages(uid))[0].content == "\\0 \x00 \\\\"


async def test_the_keyword_prefix_wins_over_the_url_even_the_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}?table_prefix=cct_rev_url_"
    assert open_store(url).tables.conversations.name == "cct_rev_url_conversations"
    explicit = open_store(url, table_prefix="convcore_")
    assert explicit.tables.conversations.name == "convcore_conversations"
    assert open_store(f"sqlite:///{tmp_path / 'q.db'}").tables.conversations.name == (
        "convcore_conversations"
    )


async def test_an_operation_that_keeps_racing_deletes_ends_in_a_storage_error(tmp_path: Path) -> None:
    from convcore_sql import store as store_module

    store = open_store(f"sqlite:///{tmp_path / 'r.db'}", retries=3)
    try:
        calls = 0

        async def always_starts_over() -> None:
            nonlocal calls
            calls += 1
            raise store_module._StartOver

        with pytest.raises(StorageError, match="racing deletes"):
            await store._run("read_context", always_starts_over)
        assert calls == 3
    finally:
        await store.aclose()


async def test_a_turn_over_max_allowed_packet_is_refused_up_front_on_mariadb() -> None:
    """MariaDB drops the connection on a statement over max_allowed_packet;
    retrying only resends it. The store says what is wrong instead, at once."""
    from tests.stores.sql import new_prefix

    if not reachable(MARIADB_URL):
        unavailable(f"MariaDB at {MARIADB_URL} is not reachable")
    store = open_store(MARIADB_URL, table_prefix=new_prefix())
    try:
        await store.append_turn(turn("c", "t0"))
        limit = store._max_packet
        assert limit is not None and limit > 0
        with pytest.raises(StorageError, match="max_allowed_packet"):
            await store.append_turn(turn("c", "t1", "x" * (limit + 1), "a"))
        assert len(await store.read_messages("c")) == 2
    finally:
        await store.drop_tables()
        await store.aclose()
