"""/api/v2/serve/datasources over HTTP: DB-GPT's flat object, the result
envelope, and a password that never comes back (nor reaches a log)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from tests.adapters.scenes_support import CHAT, assert_envelope_error, client, harness, scripted

pytestmark = pytest.mark.anyio

DS = "/api/v2/serve/datasources"
SECRET = "s3cr3t-Pa55-word-7f1e"
FIELDS = {"id", "db_type", "db_name", "db_path", "db_host", "db_port", "db_user", "db_pwd", "comment"}
OWNER = {"user_name", "sys_code"}


def _check_object(data: dict[str, object]) -> None:
    assert set(data) == FIELDS | OWNER
    assert isinstance(data["id"], int) and isinstance(data["db_port"], int)
    for name in FIELDS - {"id", "db_port"}:
        assert isinstance(data[name], str), name
    for name in OWNER:
        assert data[name] is None or isinstance(data[name], str), name
    assert data["db_pwd"] == ""


async def test_crud_never_returns_the_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = harness()
    pg = {
        "db_type": "postgresql",
        "db_name": "sales",
        "db_host": "127.0.0.1",
        "db_port": 5432,
        "db_user": "reader",
        "db_pwd": SECRET,
        "comment": "sales numbers",
    }
    async with client(h.app) as c:
        created = await c.post(DS, json=pg)
        assert created.status_code == 200, created.text
        assert SECRET not in created.text
        body = created.json()
        assert body == {"success": True, "err_code": None, "err_msg": None, "data": body["data"]}
        _check_object(body["data"])
        ds_id = body["data"]["id"]
        assert body["data"]["db_port"] == 5432 and body["data"]["db_user"] == "reader"

        second = await c.post(DS, json={"db_type": "sqlite", "db_name": "local", "db_path": "/tmp/x.db"})
        assert second.json()["data"]["id"] == ds_id + 1

        got = await c.get(f"{DS}/{ds_id}")
        assert SECRET not in got.text
        _check_object(got.json()["data"])

        listed = await c.get(DS)
        assert SECRET not in listed.text
        assert isinstance(listed.json()["data"], list) and len(listed.json()["data"]) == 2
        for item in listed.json()["data"]:
            _check_object(item)

        # Renaming a PostgreSQL datasource changes its database: the password must come again.
        moved = assert_envelope_error(await c.put(DS, json={"id": ds_id, "db_name": "sales2"}), 400)
        assert moved["err_msg"].startswith("db_pwd:") and SECRET not in str(moved)
        renamed = await c.put(DS, json={"id": ds_id, "db_name": "sales2", "db_pwd": SECRET})
        assert renamed.status_code == 200, renamed.text
        # An update without db_pwd (or with the masked "") keeps the stored password.
        updated = await c.put(DS, json={"id": ds_id, "comment": "renamed"})
        assert updated.status_code == 200, updated.text
        assert SECRET not in updated.text
        assert (
            updated.json()["data"]["comment"] == "renamed"
            and updated.json()["data"]["db_host"] == "127.0.0.1"
        )
        round_trip = dict(updated.json()["data"])  # what DB-GPT's client sends back: db_pwd ""
        round_trip["comment"] = "again"
        again = await c.put(DS, json=round_trip)
        assert again.status_code == 200 and SECRET not in again.text
        kept = await h.kit.datasources.by_name("sales2")
        assert kept is not None and kept.password == SECRET
        assert (await h.kit.datasources.by_name("sales")) is None

        changed = await c.put(DS, json={"id": ds_id, "db_pwd": "new-" + SECRET})
        assert SECRET not in changed.text
        changed_ds = await h.kit.datasources.by_name("sales2")
        assert changed_ds is not None and changed_ds.password == "new-" + SECRET

        deleted = await c.delete(f"{DS}/{ds_id}")
        assert deleted.status_code == 200 and SECRET not in deleted.text
        assert deleted.json()["data"] is not None
        _check_object(deleted.json()["data"])
        assert deleted.json()["data"]["db_name"] == "sales2"
        assert_envelope_error(await c.get(f"{DS}/{ds_id}"), 404)
        assert_envelope_error(await c.delete(f"{DS}/{ds_id}"), 404)
        # The name is free again.
        assert (await c.post(DS, json={**pg, "db_name": "sales2"})).status_code == 200

        # Even a bad request carrying the password does not echo it.
        bad = await c.post(DS, json={**pg, "db_port": "not-a-port"})
        assert_envelope_error(bad, 400)
        assert SECRET not in bad.text
    assert SECRET not in caplog.text
    assert SECRET not in repr(await h.kit.datasources.list())


async def test_bad_input_is_400_and_a_taken_name_409() -> None:
    h = harness()
    async with client(h.app) as c:
        ok = await c.post(DS, json={"db_type": "sqlite", "db_name": "one", "db_path": "/tmp/one.db"})
        assert ok.status_code == 200
        other = await c.post(DS, json={"db_type": "sqlite", "db_name": "two", "db_path": "/tmp/two.db"})
        dup = assert_envelope_error(
            await c.post(DS, json={"db_type": "sqlite", "db_name": "one", "db_path": "/x"}), 409
        )
        assert "already exists" in dup["err_msg"]
        # Renaming onto a taken name is refused and changes nothing.
        clash = await c.put(DS, json={"id": other.json()["data"]["id"], "db_name": "one"})
        assert_envelope_error(clash, 409)
        assert (await c.get(f"{DS}/{other.json()['data']['id']}")).json()["data"]["db_name"] == "two"

        assert_envelope_error(
            await c.post(DS, json={"db_type": "oracle", "db_name": "o", "db_host": "h"}), 400
        )
        assert_envelope_error(await c.post(DS, json={"db_type": "sqlite", "db_name": "nopath"}), 400)
        assert_envelope_error(await c.post(DS, json={"db_type": "postgresql", "db_name": "nohost"}), 400)
        assert_envelope_error(await c.post(DS, json={"db_name": "notype"}), 400)
        assert_envelope_error(await c.post(DS, json=[1, 2]), 400)
        assert_envelope_error(await c.put(DS, json={"db_name": "noid"}), 400)
        assert_envelope_error(await c.put(DS, json={"id": 999, "db_name": "x"}), 404)
        assert_envelope_error(await c.get(f"{DS}/not-a-number"), 404)  # ids are integers: no such route
        assert_envelope_error(await c.get(f"{DS}/12345"), 404)


async def test_sqlite_roots_confine_paths(tmp_path: Path) -> None:
    from convcore import InvalidRequestError, MemoryRecordStore
    from convcore_scenes import DatasourceIn, DatasourceRegistry

    registry = DatasourceRegistry(MemoryRecordStore(), sqlite_roots=[tmp_path])
    await registry.create(DatasourceIn(db_type="sqlite", db_name="in", db_path=str(tmp_path / "a.db")))
    with pytest.raises(InvalidRequestError):
        await registry.create(DatasourceIn(db_type="sqlite", db_name="out", db_path="/etc/passwd"))
    with pytest.raises(InvalidRequestError):
        await registry.create(
            DatasourceIn(db_type="sqlite", db_name="up", db_path=str(tmp_path / ".." / "b.db"))
        )


async def test_a_symlink_loop_is_a_clear_400_and_stores_nothing(tmp_path: Path) -> None:
    from convcore import InvalidRequestError, MemoryRecordStore
    from convcore_scenes import DatasourceIn, DatasourceRegistry

    (tmp_path / "loop.db").symlink_to(tmp_path / "loop.db")
    records = MemoryRecordStore()
    registry = DatasourceRegistry(records, sqlite_roots=[tmp_path])
    with pytest.raises(InvalidRequestError, match="cannot be resolved") as refused:
        await registry.create(DatasourceIn(db_type="sqlite", db_name="loop", db_path=str(tmp_path / "loop.db")))
    assert refused.value.field == "db_path"
    assert await registry.list() == []


async def test_password_is_not_logged_when_chatting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "t.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table t(x int)")
    h = harness(scripted(lambda m: "```sql\nSELECT x FROM t\n```"))
    async with client(h.app) as c:
        await c.post(DS, json={"db_type": "sqlite", "db_name": "t", "db_path": str(db), "db_pwd": SECRET})
        # A PostgreSQL datasource that cannot be reached: the error names no password.
        await c.post(
            DS,
            json={
                "db_type": "postgresql",
                "db_name": "gone",
                "db_host": "127.0.0.1",
                "db_port": 1,
                "db_pwd": SECRET,
            },
        )
        r = await c.post(CHAT, json={"messages": "x?", "chat_mode": "chat_data", "chat_param": "t"})
        assert r.status_code == 200 and SECRET not in r.text
        gone = await c.post(CHAT, json={"messages": "x?", "chat_mode": "chat_data", "chat_param": "gone"})
        assert gone.status_code >= 500 and SECRET not in gone.text
        assert gone.json()["success"] is False
    assert SECRET not in caplog.text
