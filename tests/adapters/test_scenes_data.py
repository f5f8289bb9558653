"""chat_data end to end over HTTP on SQLite and PostgreSQL datasources: the
schema reaches the prompt, a SELECT's rows come back as a table, and every
attempt to write is refused with the data left intact."""

from __future__ import annotations

import html
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from convcore import PromptMessage
from convcore_scenes.data_scene import DataScene
from convcore_scenes.datasources import Datasource
from convcore_scenes.dbaccess import inspect_schema, run_readonly
from convcore_scenes.sqlsafe import RefusedQuery, check_query, extract_sql
from tests.adapters.scenes_support import CHAT, Harness, client, harness, scripted, stream_text
from tests.stores import unavailable
from tests.stores.sql import PG_URL, reachable

pytestmark = pytest.mark.anyio

DS = "/api/v2/serve/datasources"


class Script:
    """The SQL the fake model answers with, changeable per turn."""

    def __init__(self) -> None:
        self.sql = "SELECT 1"

    def __call__(self, messages: tuple[PromptMessage, ...]) -> str:
        return f"Here is the query.\n```sql\n{self.sql}\n```\nIt lists the rows."


def _shop(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("create table orders (id integer primary key, customer text not null, amount real)")
        conn.execute("create table customers (name text primary key, city text)")
        conn.executemany(
            "insert into orders (customer, amount) values (?, ?)", [("ann", 3.5), ("bob", 7.0), ("cy|x", 1.0)]
        )
    return path


def _count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("select count(*) from orders").fetchone()[0])


WRITES = [
    "DELETE FROM orders",
    "DROP TABLE orders",
    "INSERT INTO orders (customer, amount) VALUES ('eve', 1)",
    "UPDATE orders SET amount = 0",
    "SELECT * FROM orders; DELETE FROM orders",
    "SELECT 1; DROP TABLE orders;",
    "WITH d AS (SELECT 1) DELETE FROM orders",
    "ATTACH DATABASE '/tmp/evil.db' AS evil",
    "PRAGMA writable_schema = 1",
    "SELECT * INTO copy FROM orders",
]


@pytest.fixture
async def sqlite_harness(tmp_path: Path) -> AsyncIterator[tuple[Harness, Script, Path]]:
    script = Script()
    h = harness(scripted(script))
    db = _shop(tmp_path / "shop.db")
    async with client(h.app) as c:
        r = await c.post(
            DS, json={"db_type": "sqlite", "db_name": "shop", "db_path": str(db), "comment": "a shop"}
        )
        assert r.status_code == 200, r.text
    yield h, script, db


async def test_select_answers_with_a_table(sqlite_harness: tuple[Harness, Script, Path]) -> None:
    h, script, _ = sqlite_harness
    script.sql = "SELECT customer, amount FROM orders ORDER BY id"
    async with client(h.app) as c:
        r = await c.post(
            CHAT, json={"messages": "amount per order?", "chat_mode": "chat_data", "chat_param": "shop"}
        )
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        assert "| customer | amount |" in content
        assert "| ann | 3.5 |" in content and "| cy\\|x | 1.0 |" in content
        assert "_(3 rows)_" in content
        # The prompt: instructions, then one block per table.
        sent = h.backend.requests[-1].messages
        assert "SQLite" in sent[0].content and "```sql" in sent[0].content and "a shop" in sent[0].content
        blocks = [m.content for m in sent[1:] if m.role == "system"]
        assert any(b.startswith("CREATE TABLE orders (") and "customer TEXT NOT NULL" in b for b in blocks)
        assert any("CREATE TABLE customers" in b for b in blocks)
        # The stored reply is the one with the table.
        messages = await h.engine.read_messages(r.json()["conv_uid"])
        assert messages[-1].content == content

        streamed = await c.post(
            CHAT,
            json={"messages": "again", "chat_mode": "chat_data", "chat_param": "shop", "stream": True},
        )
        text, chunks = stream_text(streamed.text)
        assert "| bob | 7.0 |" in text
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        stored = await h.engine.read_messages(chunks[0]["conv_uid"])
        assert stored[-1].content == text


async def test_enable_vis_answers_with_dbgpt_chart_view(sqlite_harness: tuple[Harness, Script, Path]) -> None:
    h, script, _ = sqlite_harness
    script.sql = "SELECT customer, amount, id FROM orders ORDER BY id"
    body = {"messages": "orders?", "chat_mode": "chat_data", "chat_param": "shop", "enable_vis": True}
    async with client(h.app) as c:
        r = await c.post(CHAT, json=body)
        content = r.json()["choices"][0]["message"]["content"]
        head, _, view = content.partition('\n\n<chart-view content="')
        assert head == script(()) and view.endswith('" />')
        escaped = view.removesuffix('" />')
        assert '"' not in escaped and "<" not in escaped  # one attribute, whatever the cells hold
        assert json.loads(html.unescape(escaped)) == {
            "type": "response_table",
            "sql": "SELECT customer, amount, id FROM orders ORDER BY id",
            "data": [
                {"customer": "ann", "amount": 3.5, "id": 1},
                {"customer": "bob", "amount": 7.0, "id": 2},
                {"customer": "cy|x", "amount": 1.0, "id": 3},
            ],
        }
        assert "| customer |" not in content
        streamed = await c.post(CHAT, json={**body, "stream": True})
        text, _ = stream_text(streamed.text)
        assert text.endswith(content.partition("\n\n")[2]) and "<chart-view" in text
        # A chart that does not fit the reply's budget is left out whole, with the note.
        tight = (await c.post(CHAT, json={**body, "max_new_tokens": 80})).json()["choices"][0]
        assert "<chart-view" not in tight["message"]["content"] and tight["finish_reason"] == "length"
        assert tight["message"]["content"].startswith(head + "\n\n[truncated")
        # enable_vis false, or not sent: the markdown table.
        for off in ({**body, "enable_vis": False}, {k: v for k, v in body.items() if k != "enable_vis"}):
            table = (await c.post(CHAT, json=off)).json()["choices"][0]["message"]["content"]
            assert "<chart-view" not in table and "| ann | 3.5 | 1 |" in table


async def test_row_limit_and_failed_query(sqlite_harness: tuple[Harness, Script, Path]) -> None:
    h, script, _ = sqlite_harness
    scene = h.kit.scenes()[1]
    assert isinstance(scene, DataScene)
    scene.max_rows = 2
    script.sql = "SELECT id FROM orders ORDER BY id"
    async with client(h.app) as c:
        r = await c.post(CHAT, json={"messages": "ids", "chat_mode": "chat_data", "chat_param": "shop"})
        content = r.json()["choices"][0]["message"]["content"]
        assert "| 2 |" in content and "| 3 |" not in content and "first 2 rows shown" in content
        script.sql = "SELECT nope FROM orders"
        r = await c.post(CHAT, json={"messages": "?", "chat_mode": "chat_data", "chat_param": "shop"})
        assert r.status_code == 200
        assert "**Query failed:**" in r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("sql", WRITES)
async def test_writes_are_refused_and_data_intact(
    sqlite_harness: tuple[Harness, Script, Path], sql: str
) -> None:
    h, script, db = sqlite_harness
    script.sql = sql
    async with client(h.app) as c:
        for stream in (False, True):
            r = await c.post(
                CHAT,
                json={
                    "messages": "wipe it",
                    "chat_mode": "chat_data",
                    "chat_param": "shop",
                    "stream": stream,
                },
            )
            assert r.status_code == 200, r.text
            content = stream_text(r.text)[0] if stream else r.json()["choices"][0]["message"]["content"]
            assert "**Query refused:**" in content and "nothing was executed" in content
    assert _count(db) == 3
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("select name from sqlite_master where type = 'table'")}
    assert tables == {"orders", "customers"}


async def test_sqlite_connection_itself_is_read_only(tmp_path: Path) -> None:
    db = _shop(tmp_path / "shop.db")
    ds = Datasource(id=1, db_type="sqlite", db_name="shop", db_path=str(db))
    for sql in ("DELETE FROM orders", "CREATE TABLE x (y int)"):
        with pytest.raises(Exception, match=r"readonly|read-only|read only"):
            await run_readonly(ds, sql)  # the checks bypassed on purpose
    assert _count(db) == 3
    with pytest.raises(Exception, match="interrupted"):
        await run_readonly(
            ds,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
            timeout=0.3,
        )
    missing = Datasource(id=2, db_type="sqlite", db_name="m", db_path=str(tmp_path / "missing.db"))
    with pytest.raises(Exception, match="unable to open"):
        await run_readonly(missing, "SELECT 1")
    assert not (tmp_path / "missing.db").exists()


async def test_slow_query_is_stopped(sqlite_harness: tuple[Harness, Script, Path]) -> None:
    h, script, _ = sqlite_harness
    scene = h.kit.scenes()[1]
    assert isinstance(scene, DataScene)
    scene.query_timeout = 0.3
    script.sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    async with client(h.app) as c:
        r = await c.post(
            CHAT, json={"messages": "count forever", "chat_mode": "chat_data", "chat_param": "shop"}
        )
    assert "**Query stopped:**" in r.json()["choices"][0]["message"]["content"]


async def test_reply_without_sql_is_left_alone(sqlite_harness: tuple[Harness, Script, Path]) -> None:
    h, _, _ = sqlite_harness
    h.backend.inner._reply = lambda m: "I cannot answer that with a query."  # type: ignore[attr-defined]
    async with client(h.app) as c:
        r = await c.post(CHAT, json={"messages": "poem?", "chat_mode": "chat_data", "chat_param": "shop"})
    assert r.json()["choices"][0]["message"]["content"] == "I cannot answer that with a query."


async def test_unknown_datasource_is_400() -> None:
    h = harness()
    async with client(h.app) as c:
        r = await c.post(CHAT, json={"messages": "x", "chat_mode": "chat_data", "chat_param": "nowhere"})
    assert r.status_code == 400 and "chat_param" in r.json()["err_msg"]


def test_sql_checks() -> None:
    assert extract_sql("a\n```SQL\nSELECT 1;\n```") == "SELECT 1;"
    assert extract_sql("```\nDELETE FROM t\n```") == "DELETE FROM t"
    assert extract_sql("```python\nprint(1)\n```") is None
    assert check_query("SELECT 1;", "sqlite") == "SELECT 1"
    assert check_query("select ';' as semi, \"delete\" from t -- note", "postgresql")
    assert check_query("WITH x AS (SELECT 1) SELECT * FROM x", "postgresql")
    assert check_query("SELECT replace(name, 'a', 'b'), update_time FROM t", "mysql")
    assert check_query("SELECT comment, load, cluster, release FROM servers", "postgresql")
    assert check_query("SELECT 'a\\' ; DROP TABLE t; --'", "mysql")  # one string in MySQL
    for sql, dialect in [
        ("SELECT 'a\\' ; DROP TABLE t; --'", "postgresql"),  # two statements in PostgreSQL
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "postgresql"),
        ("SELECT pg_sleep(10)", "postgresql"),
        ("SELECT query_to_xml('delete from t', true, true, '')", "postgresql"),
        ("SELECT * FROM t FOR UPDATE", "postgresql"),
        ("SELECT 1 /* ; */ ; SELECT 2", "sqlite"),
        ("SELECT 1 # ; DROP TABLE t", "postgresql"),
        ("REPLACE INTO t VALUES (1)", "mysql"),
        ("SELECT load_extension('x')", "sqlite"),
        ("", "sqlite"),
        ("SELECT 'unterminated", "sqlite"),
        ("EXPLAIN ANALYZE DELETE FROM t", "postgresql"),
    ]:
        with pytest.raises(RefusedQuery):
            check_query(sql, dialect)


# -- PostgreSQL ---------------------------------------------------------------------


@pytest.fixture
async def pg_table() -> AsyncIterator[str]:
    """A ``ccs_<hex>_orders`` table in database ``test``, dropped afterwards."""
    if not reachable(PG_URL):
        unavailable(f"PostgreSQL is not reachable at {PG_URL}")
    import asyncpg

    table = f"ccs_{uuid.uuid4().hex[:10]}_orders"
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(
            f"CREATE TABLE {table} (id int PRIMARY KEY, customer text NOT NULL, amount numeric)"
        )
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'ann', 3.5), (2, 'bob', 7)")
        yield table
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def _pg_count(table: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


def _pg_datasource() -> dict[str, object]:
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL)
    return {
        "db_type": "postgresql",
        "db_name": url.database or "test",
        "db_host": url.host or "127.0.0.1",
        "db_port": url.port or 5432,
        "db_user": url.username or "postgres",
        "db_pwd": url.password or "",
    }


@pytest.mark.postgres
async def test_postgresql_select_and_refusals(pg_table: str) -> None:
    script = Script()
    h = harness(scripted(script))
    ds = _pg_datasource()
    async with client(h.app) as c:
        assert (await c.post(DS, json=ds)).status_code == 200
        script.sql = f"SELECT customer, amount FROM {pg_table} ORDER BY id"
        question = f"what is in {pg_table}?"
        for stream in (False, True):
            r = await c.post(
                CHAT,
                json={
                    "messages": question,
                    "chat_mode": "chat_data",
                    "chat_param": ds["db_name"],
                    "stream": stream,
                },
            )
            assert r.status_code == 200, r.text
            content = stream_text(r.text)[0] if stream else r.json()["choices"][0]["message"]["content"]
            assert (
                "| customer | amount |" in content and "| ann | 3.5 |" in content and "_(2 rows)_" in content
            )
        # The table the question names is inspected first.
        blocks = [m.content for m in h.backend.requests[-1].messages if m.role == "system"][1:]
        assert blocks[0].startswith(f"CREATE TABLE {pg_table} (")

        for sql in (
            f"DELETE FROM {pg_table}",
            f"DROP TABLE {pg_table}",
            f"INSERT INTO {pg_table} VALUES (3, 'eve', 1)",
            f"SELECT 1; DELETE FROM {pg_table}",
            f"WITH d AS (DELETE FROM {pg_table} RETURNING *) SELECT * FROM d",
            f"SELECT * FROM {pg_table} FOR UPDATE",
        ):
            script.sql = sql
            r = await c.post(
                CHAT, json={"messages": question, "chat_mode": "chat_data", "chat_param": ds["db_name"]}
            )
            assert "**Query refused:**" in r.json()["choices"][0]["message"]["content"], sql
    assert await _pg_count(pg_table) == 2


@pytest.mark.postgres
async def test_postgresql_connection_itself_is_read_only(pg_table: str) -> None:
    fields = _pg_datasource()
    ds = Datasource(id=1, **fields)  # type: ignore[arg-type]
    for sql in (
        f"DELETE FROM {pg_table}",
        f"WITH d AS (DELETE FROM {pg_table} RETURNING *) SELECT * FROM d",
        f"CREATE TABLE {pg_table}_x (y int)",
    ):
        with pytest.raises(Exception, match="read-only"):
            await run_readonly(ds, sql)  # the checks bypassed on purpose
    with pytest.raises(Exception, match=r"multiple commands|cannot insert multiple"):
        await run_readonly(ds, f"SELECT 1; DELETE FROM {pg_table}")
    with pytest.raises(Exception, match=r"statement timeout|canceling statement"):
        await run_readonly(ds, "SELECT pg_sleep(5)", timeout=0.3)
    assert await _pg_count(pg_table) == 2
    tables = await inspect_schema(ds, question=pg_table, max_tables=5)
    assert tables[0].name == pg_table
    assert [c.name for c in tables[0].columns] == ["id", "customer", "amount"]
