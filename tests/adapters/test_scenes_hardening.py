"""Hardening of chat_data and the serve routers against hostile input: SQL
that hides a side effect from the checks, values built to eat memory, SQLite
paths into the server's own store, and request bodies that used to get a 500."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import InvalidRequestError, MemoryRecordStore, open_store
from convcore_scenes import DatasourceIn, DatasourceRegistry, SceneKit
from convcore_scenes.datasources import Datasource
from convcore_scenes.dbaccess import MAX_CELL_BYTES, run_readonly
from convcore_scenes.sqlsafe import RefusedQuery, check_query
from convcore_scenes.targets import store_sqlite_file
from convcore_server.cli import parse_args
from tests.adapters.scenes_support import CHAT, assert_envelope_error, client, harness, scripted
from tests.stores import unavailable
from tests.stores.sql import MARIADB_URL, reachable

pytestmark = pytest.mark.anyio

DS = "/api/v2/serve/datasources"

# Each hides a side-effecting call from a name check or runs code the checks read as a comment/string.
HIDDEN = [
    ('SELECT "pg_sleep"(5)', "postgresql"),
    ("SELECT \"pg_read_file\"('/etc/passwd')", "postgresql"),
    ('SELECT pg_catalog."pg_terminate_backend"(pid) FROM pg_stat_activity', "postgresql"),
    ('SELECT U&"\\0070g_sleep"(5)', "postgresql"),
    ("SELECT E'\\'', pg_sleep(5), E'\\''", "postgresql"),  # E-strings take backslash escapes
    ("SELECT 1 AS a$x$, pg_sleep(5) AS b$x$", "postgresql"),  # a$x$ is an identifier, not a quote
    ("SELECT pg_stat_reset()", "postgresql"),
    ("SELECT pg_ls_waldir()", "postgresql"),
    ("SELECT database_to_xml(true, true, '')", "postgresql"),
    ("SELECT 1 /*! , sleep(5) */", "mysql"),  # MySQL runs /*! … */
    ("SELECT * FROM t /*!50000 INTO OUTFILE '/tmp/x' */", "mariadb"),
    ("SELECT 1 --1, sleep(5)", "mysql"),  # "--" without a space is two minus signs in MySQL
    ("SELECT `sleep`(5)", "mysql"),
    ("SELECT randomblob(1000000000)", "sqlite"),
    ("SELECT zeroblob(1000000000)", "sqlite"),
    ("SELECT \"load_extension\"('x')", "sqlite"),
    ("SELECT [load_extension]('x')", "sqlite"),
    ("SELECT 1\x00", "sqlite"),
]


@pytest.mark.parametrize(("sql", "db_type"), HIDDEN)
def test_hidden_side_effects_are_refused(sql: str, db_type: str) -> None:
    with pytest.raises(RefusedQuery):
        check_query(sql, db_type)


@pytest.mark.parametrize(
    ("sql", "db_type"),
    [
        ("SELECT E'it\\'s' AS a, 'x' || name FROM t", "postgresql"),
        ("SELECT a$b FROM t", "postgresql"),
        ("SELECT $$a;b$$ AS x", "postgresql"),
        ("SELECT 1--1", "mysql"),
        ("SELECT 1 -- note\n, 2", "mysql"),
        ("SELECT \"order\" FROM t WHERE x IN ('a', 'b')", "sqlite"),
        ("SELECT count(*), upper(name) FROM t", "sqlite"),
    ],
)
def test_ordinary_queries_still_run(sql: str, db_type: str) -> None:
    assert check_query(sql, db_type)


async def test_sqlite_values_and_results_are_bounded(tmp_path: Path) -> None:
    db = tmp_path / "big.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table t(a text)")
        conn.executemany("insert into t values (?)", [("x" * 100_000,)] * 200)
    ds = Datasource(id=1, db_type="sqlite", db_name="big", db_path=str(db))
    # printf builds a 100 MB value unless the connection's length limit stops it.
    try:
        result = await run_readonly(ds, "SELECT printf('%.*c', 100000000, 'x')")
    except Exception as exc:  # "string or blob too big"
        assert "too big" in str(exc)
    else:
        assert all(v is None or len(v) <= MAX_CELL_BYTES for row in result.rows for v in row)
    result = await run_readonly(ds, "SELECT a || a || a FROM t")
    assert result.truncated and len(result.rows) < 100
    assert all(len(v) <= MAX_CELL_BYTES for row in result.rows for v in row)


@pytest.mark.mysql
async def test_mariadb_runner_bounds_the_result() -> None:
    if not reachable(MARIADB_URL):
        unavailable(f"MariaDB is not reachable at {MARIADB_URL}")
    from sqlalchemy.engine import make_url

    url = make_url(MARIADB_URL)
    ds = Datasource(
        id=1,
        db_type="mariadb",
        db_name=url.database or "test",
        db_host=url.host or "127.0.0.1",
        db_port=url.port or 3306,
        db_user=url.username or "root",
    )
    result = await run_readonly(ds, "SELECT 'a\\'b' AS s, 1--1 AS n")
    assert result.rows == (("a'b", 2),)
    mode = (await run_readonly(ds, "SELECT @@SESSION.sql_mode")).rows[0][0]
    assert "NO_BACKSLASH_ESCAPES" not in mode and "ANSI_QUOTES" not in mode
    result = await run_readonly(ds, "SELECT REPEAT('x', 200000) FROM information_schema.columns")
    assert result.truncated and len(result.rows) < 100
    assert all(len(v) <= MAX_CELL_BYTES for row in result.rows for v in row)


# -- SQLite paths ---------------------------------------------------------------


async def test_sqlite_roots_empty_refuses_and_denied_files_are_refused(tmp_path: Path) -> None:
    store_file = tmp_path / "convcore.db"
    sqlite3.connect(store_file).close()
    none_allowed = DatasourceRegistry(MemoryRecordStore(), sqlite_roots=[])
    with pytest.raises(InvalidRequestError, match="not enabled"):
        await none_allowed.create(DatasourceIn(db_type="sqlite", db_name="a", db_path=str(tmp_path / "a.db")))
    registry = DatasourceRegistry(MemoryRecordStore(), sqlite_roots=[tmp_path], sqlite_denied=[store_file])
    link = tmp_path / "innocent.db"
    link.symlink_to(store_file)
    for path in (store_file, link, tmp_path / "sub" / ".." / "convcore.db"):
        with pytest.raises(InvalidRequestError, match="keeps its own data"):
            await registry.create(DatasourceIn(db_type="sqlite", db_name="own", db_path=str(path)))


async def test_paths_are_checked_again_before_chatting(tmp_path: Path) -> None:
    """A datasource saved before the roots were narrowed cannot be chatted with."""
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table t(x int)")
    records = MemoryRecordStore()
    await SceneKit(records).datasources.create(DatasourceIn(db_type="sqlite", db_name="old", db_path=str(db)))
    h = harness(scripted(lambda m: "```sql\nSELECT x FROM t\n```"), records=records)
    h.kit.datasources.sqlite_roots = (tmp_path / "elsewhere",)
    async with client(h.app) as c:
        r = await c.post(CHAT, json={"messages": "x?", "chat_mode": "chat_data", "chat_param": "old"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "db_path"
    assert not h.backend.requests


def test_serve_confines_sqlite_datasources() -> None:
    assert parse_args(["--api-key", "k"], environ={}).sqlite_roots == ()
    opts = parse_args(["--api-key", "k", "--sqlite-root", "/a"], environ={"CONVCORE_SQLITE_ROOTS": "/b:/c"})
    assert opts.sqlite_roots == ("/a", "/b", "/c")
    assert store_sqlite_file("sqlite:///convcore.db") == "convcore.db"
    assert store_sqlite_file("sqlite:////srv/x.db") == "/srv/x.db"
    assert store_sqlite_file("memory://") is None and store_sqlite_file("postgresql://u:p@h/d") is None


# -- the serve routers' bodies ------------------------------------------------------

WRITE_ROUTES = [
    ("POST", "/api/v2/serve/apps"),
    ("PUT", "/api/v2/serve/apps"),
    ("PUT", "/api/v2/serve/apps/some-app"),
    ("POST", DS),
    ("PUT", DS),
    ("POST", "/api/v2/serve/knowledge/spaces"),
    ("PUT", "/api/v2/serve/knowledge/spaces"),
    ("POST", "/api/v2/serve/knowledge/documents"),
    ("POST", "/api/v2/serve/awel/flows"),
    ("PUT", "/api/v2/serve/awel/flows/some-flow"),
]


@pytest.mark.parametrize(("method", "path"), WRITE_ROUTES)
async def test_oversized_and_deep_bodies_are_4xx_envelopes(method: str, path: str) -> None:
    h = harness()
    json_type = {"content-type": "application/json"}
    async with client(h.app) as c:
        big = b'{"name": "' + b"x" * (5 * 1024 * 1024) + b'"}'
        body = assert_envelope_error(await c.request(method, path, content=big, headers=json_type), 413)
        assert body["err_code"] == "payload_too_large"
        deep = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
        assert_envelope_error(await c.request(method, path, content=deep, headers=json_type), 400)


async def test_document_bodies_are_read_strictly(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        h = harness(records=store.records)
        docs = "/api/v2/serve/knowledge/documents"
        async with client(h.app) as c:
            assert (await c.post("/api/v2/serve/knowledge/spaces", json={"name": "s"})).status_code == 200
            json_type = {"content-type": "application/json"}
            for raw in (b'{"space_name": "s", "content": "a \\ud800 b"}', b'{"space_name": NaN}', b"[1]"):
                assert_envelope_error(await c.post(docs, content=raw, headers=json_type), 400)
            no_boundary = {"content-type": "multipart/form-data"}
            assert_envelope_error(await c.post(docs, content=b"x", headers=no_boundary), 400)
            r = await c.post(docs, json={"space_name": "s", "content": "fine"})
            assert r.status_code == 200, r.text
    finally:
        await store.aclose()


# -- fuzzing the serve routers ---------------------------------------------------------

FUZZ = harness()
ROUTES = [
    *WRITE_ROUTES,
    ("GET", "/api/v2/serve/apps"),
    ("GET", DS),
    ("GET", f"{DS}/1"),
    ("DELETE", f"{DS}/1"),
    ("GET", "/api/v2/serve/knowledge/spaces/1"),
    ("DELETE", "/api/v2/serve/knowledge/spaces/x"),
    ("GET", "/api/v2/serve/knowledge/documents"),
    ("DELETE", "/api/v2/serve/knowledge/documents/1"),
    ("GET", "/api/v2/serve/awel/flows"),
    ("DELETE", "/api/v2/serve/awel/flows/x"),
]
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
known = st.sampled_from(
    ["app_name", "app_code", "db_type", "db_name", "db_path", "db_host", "db_port", "db_pwd", "id", "name",
     "space_name", "space_id", "content", "chunk_size", "chunk_overlap", "flow_data", "uid", "temperature"]
)  # fmt: skip
bodies = st.dictionaries(known | st.text(max_size=6), json_values, max_size=5).map(
    lambda d: json.dumps(d).encode()
) | st.binary(max_size=100)
params = st.dictionaries(
    st.sampled_from(["page", "page_size", "space_id", "space_name", "name"]), st.text(max_size=6)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=bodies, query=params, ctype=st.sampled_from(["application/json", "multipart/form-data; boundary=x", "text/plain"]))  # fmt: skip
def test_fuzzed_serve_requests_never_5xx(
    route: tuple[str, str], body: bytes, query: dict[str, str], ctype: str
) -> None:
    method, path = route

    async def go() -> httpx.Response:
        async with client(FUZZ.app) as c:
            return await c.request(method, path, content=body, params=query, headers={"content-type": ctype})

    response = anyio.run(go)
    assert response.status_code < 500, (method, path, body, response.text)
    data: dict[str, Any] = response.json()
    assert isinstance(data.get("success"), bool), data
    if not data["success"]:
        assert data["data"] is None and data["err_code"] and data["err_msg"]


# -- the function allow-list ----------------------------------------------------------

NOT_ALLOWED = [
    ("SELECT pg_backup_start('x')", "postgresql"),
    ("SELECT pg_logical_emit_message(true, 'p', 'payload')", "postgresql"),
    ("SELECT pg_advisory_lock(1)", "postgresql"),
    ("SELECT pg_catalog.pg_try_advisory_lock_shared(1)", "postgresql"),
    ("SELECT lo_get(16384)", "postgresql"),
    ("SELECT current_setting('data_directory')", "postgresql"),
    ("SELECT * FROM generate_series(1, 1000000000000)", "postgresql"),
    ("SELECT x FROM t WHERE pg_notify('c', x) IS NULL", "postgresql"),
    ("SELECT release_lock('a')", "mariadb"),
    ("SELECT get_lock('a', 10)", "mysql"),
    ("SELECT sys_exec('id')", "mysql"),
    ("SELECT fts3_tokenizer('simple')", "sqlite"),
    ("SELECT readfile('/etc/passwd')", "sqlite"),
]


@pytest.mark.parametrize(("sql", "db_type"), NOT_ALLOWED)
def test_functions_off_the_allow_list_are_refused(sql: str, db_type: str) -> None:
    with pytest.raises(RefusedQuery, match="not among the functions"):
        check_query(sql, db_type)


@pytest.mark.parametrize(
    ("sql", "db_type"),
    [
        (
            "SELECT date_trunc('month', d) AS m, count(*), sum(x), round(avg(x), 2), "
            "string_agg(name, ',') FROM t GROUP BY 1 ORDER BY 1",
            "postgresql",
        ),
        ("SELECT coalesce(a, 0), lower(b), extract(year FROM d), d::date FROM t", "postgresql"),
        ("SELECT name, rank() OVER (ORDER BY x DESC) FROM t WHERE EXISTS (SELECT 1 FROM u)", "postgresql"),
        ("SELECT date_format(d, '%Y-%m'), ifnull(a, 0), group_concat(b) FROM t GROUP BY 1", "mysql"),
        ("SELECT strftime('%Y', d), julianday(d), ifnull(a, 0), substr(s, 1, 3) FROM t", "sqlite"),
    ],
)
def test_everyday_functions_are_allowed(sql: str, db_type: str) -> None:
    assert check_query(sql, db_type)


def test_a_mysql_query_stays_in_its_own_database() -> None:
    assert check_query("SELECT * FROM shop.orders", "mysql", "shop")
    assert check_query("SELECT table_name FROM information_schema.tables", "mariadb", "shop")
    for sql in ("SELECT value FROM test.convcore_records", "SELECT * FROM orders JOIN mysql.user u ON 1=1"):
        with pytest.raises(RefusedQuery, match="only this datasource's own"):
            check_query(sql, "mariadb", "shop")
