"""Attacks on datasources over HTTP: sending a stored password to a server of
the attacker's choosing, pointing chat_data at the service's own store, and
registering another user's SQLite file again under a new name."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from convcore import (
    Engine,
    InvalidRequestError,
    MemoryRecordStore,
    ModelRegistry,
    ModelSpec,
    Storage,
    open_store,
)
from convcore.testing import RecordingBackend
from convcore_scenes import DatasourceIn, DatasourceRegistry, DuplicateError, SceneKit
from convcore_scenes.secret_box import SecretBox
from convcore_scenes.targets import UnresolvedHostError, resolve_host
from convcore_server import create_app
from convcore_server.cli import ARGV_ENV, app_factory
from tests.adapters.scenes_support import CHAT, KEY, client, harness, scripted
from tests.stores import unavailable
from tests.stores.sql import PG_URL, drop_namespace, reachable, with_table_prefix

pytestmark = pytest.mark.anyio

DS = "/api/v2/serve/datasources"
SECRET = "alice-Pa55word-9c1d"


# -- a fake PostgreSQL server that asks for the password in clear ----------------------------


@dataclass
class PasswordTrap:
    """Speaks PostgreSQL's startup far enough to be sent a cleartext password."""

    captured: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length, code = struct.unpack("!ii", await reader.readexactly(8))
                if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not here
                    writer.write(b"N")
                    await writer.drain()
                    continue
                await reader.readexactly(length - 8)  # the startup parameters
                break
            writer.write(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            await writer.drain()
            kind = await reader.readexactly(1)
            (size,) = struct.unpack("!i", await reader.readexactly(4))
            payload = await reader.readexactly(size - 4)
            if kind == b"p":
                self.captured.append(payload.rstrip(b"\0").decode("utf-8", "replace"))
            error = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
            writer.write(b"E" + struct.pack("!i", len(error) + 4) + error)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def trap() -> AsyncIterator[PasswordTrap]:
    found = PasswordTrap()
    server = await asyncio.start_server(found.handle, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    try:
        yield found
    finally:
        server.close()
        await server.wait_closed()


async def test_a_stored_password_cannot_be_sent_to_another_server(
    trap: PasswordTrap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h = harness(
        scripted(lambda m: "```sql\nSELECT 1\n```"), user_keys={"alice-key": "alice", "bob-key": "bob"}
    )
    turn = {"messages": "count", "chat_mode": "chat_data", "chat_param": "alice_pg"}
    async with client(h.app, "alice-key") as alice, client(h.app, "bob-key") as bob, client(h.app) as op:
        created = await alice.post(
            DS,
            json={
                "db_type": "postgresql",
                "db_name": "alice_pg",
                "db_host": "127.0.0.1",
                "db_port": 1,
                "db_user": "alice",
                "db_pwd": SECRET,
            },
        )
        assert created.status_code == 200, created.text
        ds_id = created.json()["data"]["id"]
        redirect = {"id": ds_id, "db_host": "127.0.0.1", "db_port": trap.port}

        # Another user points alice's datasource at the trap and runs one turn.
        bob_put = await bob.put(DS, json=redirect)
        bob_turn = await bob.post(CHAT, json=turn)
        assert trap.captured == []
        assert bob_put.status_code == 404 and bob_turn.status_code == 400  # not there for bob
        # The operator (or alice herself) may not move it without giving the password again.
        moved = await op.put(DS, json=redirect)
        assert moved.status_code == 400 and moved.json()["err_msg"].startswith("db_pwd:"), moved.text
        assert (await alice.put(DS, json={**redirect, "db_pwd": ""})).status_code == 400
        for key in (alice, op):
            await key.post(CHAT, json=turn)  # still at port 1: fails, sends nothing to the trap
        assert trap.captured == []

        # The trap works: a move that carries a password sends that one, and only that one.
        assert (await alice.put(DS, json={**redirect, "db_pwd": "given-again"})).status_code == 200
        failed = await alice.post(CHAT, json=turn)
        assert failed.status_code >= 500 and "given-again" not in failed.text
        assert trap.captured == ["given-again"]
        for r in (created, moved):
            assert SECRET not in r.text
    assert SECRET not in caplog.text and "given-again" not in caplog.text


async def test_passwords_are_sealed_at_rest_and_never_stored_without_a_key() -> None:
    records = MemoryRecordStore()
    old = SecretBox.generate_key()
    h = harness(records=records, secrets=SecretBox([old]))
    pg = {"db_type": "postgresql", "db_name": "sealed", "db_host": "127.0.0.1", "db_pwd": SECRET}
    async with client(h.app) as c:
        assert (await c.post(DS, json=pg)).status_code == 200
    stored = await records.list("datasource")
    assert SECRET not in str(stored) and stored[0]["db_pwd_sealed"]
    found = await h.kit.datasources.by_name("sealed")
    assert found is not None and found.password == SECRET

    # Rotation: a new key first, the old one after; reseal moves every password under the new key.
    newer = SecretBox.generate_key()
    rotated = harness(records=records, secrets=SecretBox([newer, old]))
    assert await rotated.kit.datasources.reseal() == (1, 0)
    only_new = harness(records=records, secrets=SecretBox([newer]))
    again = await only_new.kit.datasources.by_name("sealed")
    assert again is not None and again.password == SECRET

    # Without a key, a password is refused rather than stored in clear; none needed, none refused.
    bare = harness(records=MemoryRecordStore(), secrets=None)
    async with client(bare.app) as c:
        refused = await c.post(DS, json=pg)
        assert refused.status_code == 400 and refused.json()["err_msg"].startswith("db_pwd:")
        assert SECRET not in refused.text
        assert (await c.post(DS, json={**pg, "db_pwd": ""})).status_code == 200


# -- chat_data against the service's own PostgreSQL database -----------------------------------


async def test_chat_data_cannot_reach_the_stores_own_postgresql_database() -> None:
    if not reachable(PG_URL):
        unavailable(f"PostgreSQL is not reachable at {PG_URL}")
    prefix = f"cca_{uuid.uuid4().hex[:10]}_"
    url = with_table_prefix(PG_URL, prefix)
    store = open_store(url)
    try:
        await _own_database_is_refused(store, url, prefix)
    finally:
        await store.aclose()
        await drop_namespace(url)


async def _own_database_is_refused(store: Storage, url: str, prefix: str) -> None:
    steal = f"```sql\nSELECT content FROM {prefix}messages\n```"
    backend = RecordingBackend(scripted(lambda m: steal).inner)
    models = ModelRegistry([ModelSpec("test-model", backend, context_window=8192, max_new_tokens=256)])
    records = store.records
    kit = SceneKit(records, secrets=SecretBox([SecretBox.generate_key()]), store_url=url)
    engine = Engine(store, models, scenes=kit.scenes())
    app = create_app(engine, api_keys=[KEY], user_keys={"bob-key": "bob"}, extra_routers=kit.routers())
    async with client(app) as op, client(app, "bob-key") as bob:
        mine = await op.post(CHAT, json={"messages": "alice-private-message", "user_name": "alice"})
        assert mine.status_code == 200, mine.text
        for host, port in [("127.0.0.1", 5432), ("localhost", 0), ("0.0.0.0", 5432), ("::1", 5432)]:
            ds = {
                "db_type": "postgresql",
                "db_name": "test",
                "db_host": host,
                "db_port": port,
                "db_user": "postgres",
            }
            r = await bob.post(DS, json={**ds, "db_name": "test"})
            assert r.status_code == 400, (host, r.text)
            assert r.json()["err_msg"].startswith("db_host:"), r.text
        # A datasource already stored (before this check existed) is refused when it is queried.
        await records.put(
            "datasource",
            "000000000001",
            {
                "id": 1,
                "db_type": "postgresql",
                "db_name": "test",
                "db_host": "localhost",
                "db_port": 5432,
                "db_user": "postgres",
                "db_pwd": "",
                "user_name": "bob",
            },
        )
        await records.put("datasource:by_db_name", "test", {"key": "000000000001"})
        turn = await bob.post(CHAT, json={"messages": "x", "chat_mode": "chat_data", "chat_param": "test"})
        assert turn.status_code == 400 and turn.json()["error"]["param"] == "db_host", turn.text
        assert "alice-private-message" not in turn.text
    assert len(backend.requests) == 1  # alice's own turn; the refused one never reached the model


# -- which addresses count as the store's own ---------------------------------------------------

OWN_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _pg(host: str, port: int = 5432, db: str = "test") -> DatasourceIn:
    return DatasourceIn(db_type="postgresql", db_name=db, db_host=host, db_port=port)


@pytest.mark.parametrize(
    ("store_url", "ds"),
    [
        (OWN_PG, _pg("localhost")),
        (OWN_PG, _pg("127.0.0.1", 0)),  # the default port
        (OWN_PG, _pg("127.0.0.2")),
        (OWN_PG, _pg("0.0.0.0")),
        (OWN_PG, _pg("::ffff:127.0.0.1")),
        (OWN_PG, _pg("[::1]")),
        (OWN_PG, _pg(socket.gethostname())),
        (OWN_PG, _pg("localhost.")),
        (OWN_PG, _pg("127.1")),  # the resolver's shorthands
        (OWN_PG, _pg("2130706433")),
        (OWN_PG, _pg("0")),
        ("postgresql+asyncpg://u:p@localhost/test", _pg("127.0.0.1")),
        (
            "mariadb://root@localhost:3306/test",
            DatasourceIn(db_type="mariadb", db_name="test", db_host="127.0.0.1", db_port=3306),
        ),
        (
            "mysql+aiomysql://root@127.0.0.1/test",
            DatasourceIn(db_type="mysql", db_name="test", db_host="localhost"),
        ),
    ],
)
async def test_every_address_of_the_stores_database_is_refused(store_url: str, ds: DatasourceIn) -> None:
    registry = DatasourceRegistry(MemoryRecordStore(), store_url=store_url)
    try:
        await resolve_host(ds.db_host or "")
    except UnresolvedHostError:
        # A name that resolves to nothing here is saved; the check runs again before each query.
        saved = await registry.create(ds)
        with pytest.raises(UnresolvedHostError):
            await registry.connectable(saved)
        return
    except InvalidRequestError:
        pass  # not a host name at all: refused below
    with pytest.raises(InvalidRequestError) as refused:
        await registry.create(ds)
    assert refused.value.field == "db_host"
    assert await registry.list() == []


async def test_other_databases_and_ports_on_the_same_server_are_allowed() -> None:
    registry = DatasourceRegistry(MemoryRecordStore(), store_url=OWN_PG)
    assert await registry.create(_pg("127.0.0.1", db="warehouse"))
    assert await registry.create(_pg("127.0.0.1", port=5433, db="test2"))


@pytest.mark.parametrize(
    "host", ["/var/run/postgresql", "127.0.0.1,10.0.0.1", "a b", "h?sslmode=disable", "-h"]
)
async def test_a_host_is_one_name_or_address(host: str) -> None:
    registry = DatasourceRegistry(MemoryRecordStore())
    with pytest.raises(InvalidRequestError) as refused:
        await registry.create(_pg(host))
    assert refused.value.field == "db_host"


async def test_the_stores_sqlite_file_is_refused_under_any_name(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    sqlite3.connect(store).close()
    (tmp_path / "alias.db").symlink_to(store)
    os.link(store, tmp_path / "hardlink.db")
    registry = DatasourceRegistry(MemoryRecordStore(), store_url=f"sqlite:///{store}")
    for name in ("store.db", "alias.db", "hardlink.db"):
        with pytest.raises(InvalidRequestError):
            await registry.create(DatasourceIn(db_type="sqlite", db_name=name, db_path=str(tmp_path / name)))


async def test_plain_text_passwords_from_before_are_sealed_at_start(caplog: pytest.LogCaptureFixture) -> None:
    records = MemoryRecordStore()
    legacy = {"id": 1, "db_type": "postgresql", "db_name": "old", "db_host": "h", "db_pwd": SECRET}
    await records.put("datasource", "000000000001", legacy)
    await records.put("datasource:by_db_name", "old", {"key": "000000000001"})
    unkeyed = DatasourceRegistry(records)
    assert await unkeyed.reseal() == (0, 1)
    assert "plain text" in caplog.text and SECRET not in caplog.text
    keyed = DatasourceRegistry(records, secrets=SecretBox([SecretBox.generate_key()]))
    assert await keyed.reseal() == (1, 0)
    assert SECRET not in str(await records.list("datasource"))
    found = await keyed.by_name("old")
    assert found is not None and found.password == SECRET and found.user_name is None


# -- another user's SQLite file, registered again --------------------------------------------

ROWS_SQL = "```sql\nSELECT x FROM secrets\n```"


def _rows_file(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("create table secrets(x text)")
        conn.execute("insert into secrets values ('alice-private-row')")
    return path


def _sqlite(name: str, path: Path | str) -> dict[str, str]:
    return {"db_type": "sqlite", "db_name": name, "db_path": str(path)}


def _chat_data(name: str) -> dict[str, str]:
    return {"messages": "show me", "chat_mode": "chat_data", "chat_param": name}


async def _stored(records: MemoryRecordStore) -> dict[str, list[dict[str, object]]]:
    kinds = ("datasource", "datasource:by_db_name", "datasource:by_db_path")
    return {kind: await records.list(kind) for kind in kinds}


async def test_another_users_sqlite_file_cannot_be_registered_under_any_name(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    db = _rows_file(root / "rows.db")
    (root / "link.db").symlink_to(db)
    records = MemoryRecordStore()
    h = harness(
        scripted(lambda m: ROWS_SQL), records=records, user_keys={"alice-key": "alice", "bob-key": "bob"}
    )
    h.kit.datasources.sqlite_roots = (root,)
    forms = [db, root / "sub" / ".." / "rows.db", root / "link.db", os.path.relpath(db)]
    async with client(h.app, "alice-key") as alice, client(h.app, "bob-key") as bob:
        assert (await alice.post(DS, json=_sqlite("alice_rows", db))).status_code == 200
        before = await _stored(records)
        for n, form in enumerate(forms):
            refused = await bob.post(DS, json=_sqlite(f"bob_rows{n}", form))
            assert refused.status_code == 409, (form, refused.text)
            assert refused.json()["err_code"] == "duplicate"
            assert (
                refused.json()["err_msg"].startswith("db_path:") and "alice" not in refused.json()["err_msg"]
            )
            turn = await bob.post(CHAT, json=_chat_data(f"bob_rows{n}"))
            assert turn.status_code == 400 and "alice-private-row" not in turn.text
        assert await _stored(records) == before  # nothing stored, no name or file claimed
        assert (await bob.get(DS)).json()["data"] == []

        # Deleted, the file is free again: now it is bob's.
        alices = before["datasource"][0]["id"]
        assert (await alice.delete(f"{DS}/{alices}")).status_code == 200
        assert await records.list("datasource:by_db_path") == []
        assert (await bob.post(DS, json=_sqlite("bob_rows", root / "link.db"))).status_code == 200
        assert "alice-private-row" in (await bob.post(CHAT, json=_chat_data("bob_rows"))).text
        assert (await alice.post(DS, json=_sqlite("alice_rows", db))).status_code == 409


async def test_moving_a_datasource_onto_a_taken_file_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    records = MemoryRecordStore()
    h = harness(records=records, user_keys={"alice-key": "alice", "bob-key": "bob"})
    async with client(h.app, "alice-key") as alice, client(h.app, "bob-key") as bob:
        assert (await alice.post(DS, json=_sqlite("alice_rows", root / "a.db"))).status_code == 200
        created = await bob.post(DS, json=_sqlite("bob_rows", root / "b.db"))
        bobs = created.json()["data"]
        before = await _stored(records)
        for move in (
            {"db_path": str(root / "a.db")},
            {"db_path": str(root / "x" / ".." / "a.db"), "db_name": "n"},
        ):
            refused = await bob.put(DS, json={"id": bobs["id"], **move})
            assert refused.status_code == 409 and refused.json()["err_msg"].startswith("db_path:"), (
                refused.text
            )
        assert (await bob.get(f"{DS}/{bobs['id']}")).json()["data"] == bobs
        assert await _stored(records) == before

        # Another form of its own file is still its own file; a move frees the old one.
        same = await bob.put(DS, json={"id": bobs["id"], "db_path": str(root / "x" / ".." / "b.db")})
        assert same.status_code == 200, same.text
        assert (await bob.put(DS, json={"id": bobs["id"], "db_path": str(root / "c.db")})).status_code == 200
        assert len(await records.list("datasource:by_db_path")) == 2  # a.db and c.db
        assert (await alice.post(DS, json=_sqlite("alice_b", root / "b.db"))).status_code == 200
        assert (await alice.post(DS, json=_sqlite("alice_c", root / "c.db"))).status_code == 409


async def test_files_of_datasources_stored_before_are_claimed_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path.resolve()
    records = MemoryRecordStore()
    # As stored before files were claimed: the record and its name's claim only; two share a file.
    legacy = [
        (1, "old_own", "alice", "own.db"),
        (2, "old_shared", "alice", "shared.db"),
        (3, "old_too", "carol", "shared.db"),
    ]
    for ds_id, name, owner, file in legacy:
        await records.put(
            "datasource", f"{ds_id:012d}", {"id": ds_id, **_sqlite(name, root / file), "user_name": owner}
        )
        await records.put("datasource:by_db_name", name, {"key": f"{ds_id:012d}"})
    h = harness(records=records, user_keys={"alice-key": "alice", "bob-key": "bob", "carol-key": "carol"})
    await h.kit.ready()
    await h.kit.ready()  # again, as at every start: nothing changes
    warnings = [r.getMessage() for r in caplog.records if "open a file another datasource" in r.getMessage()]
    assert len(warnings) == 2 and "old_too" in warnings[0] and "old_own" not in warnings[0]
    async with (
        client(h.app, "alice-key") as alice,
        client(h.app, "bob-key") as bob,
        client(h.app, "carol-key") as carol,
    ):
        for n, file in enumerate(["own.db", "shared.db", "sub/../shared.db"]):
            assert (await bob.post(DS, json=_sqlite(f"bob{n}", root / file))).status_code == 409, file
        for name in ("old_shared", "old_too"):
            assert await h.kit.datasources.by_name(name) is not None  # both keep working
        # The one holding the shared file goes; the other keeps it from a third.
        assert (await alice.delete(f"{DS}/2")).status_code == 200
        assert (await bob.post(DS, json=_sqlite("bob_shared", root / "shared.db"))).status_code == 409
        assert (await carol.delete(f"{DS}/3")).status_code == 200
        assert (await bob.post(DS, json=_sqlite("bob_shared", root / "shared.db"))).status_code == 200


async def test_a_starting_worker_claims_the_files_of_older_datasources(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'convcore.db'}"
    older = open_store(url)
    await older.records.put("datasource", "000000000001", {"id": 1, **_sqlite("old", tmp_path / "old.db")})
    await older.records.put("datasource:by_db_name", "old", {"key": "000000000001"})
    await older.aclose()
    monkeypatch.setenv(ARGV_ENV, json.dumps(["--no-auth", "--store", url, "--no-metrics"]))
    app = app_factory()
    async with app.router.lifespan_context(app):
        records = app.state.convcore.engine.store.records
        claim = await records.get("datasource:by_db_path", str((tmp_path / "old.db").resolve()))
    assert claim == {"key": "000000000001"}


class YieldingRecords(MemoryRecordStore):
    """Memory records that let other tasks run before every call, as a
    networked store would: concurrent writers interleave step by step."""

    async def put(self, kind: str, key: str, value: dict[str, Any], *, create_only: bool = False) -> None:
        await asyncio.sleep(0)
        await super().put(kind, key, value, create_only=create_only)

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        return await super().get(kind, key)

    async def delete(self, kind: str, key: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        return await super().delete(kind, key)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_two_creates_of_one_file_at_once_one_wins(tmp_path: Path, backend: str) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}") if backend == "sqlite" else None
    records = store.records if store is not None else YieldingRecords()
    registry = DatasourceRegistry(records)
    db = tmp_path / "rows.db"
    (tmp_path / "link.db").symlink_to(db)
    forms = [db, tmp_path / "sub" / ".." / "rows.db", tmp_path / "link.db", db]
    try:
        results = await asyncio.gather(
            *(registry.create(DatasourceIn(**_sqlite(f"racer{n}", form))) for n, form in enumerate(forms)),
            return_exceptions=True,
        )
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(lost) == len(forms) - 1, results
        assert all(isinstance(r, DuplicateError) and r.field == "db_path" for r in lost), lost
        assert len(await registry.list()) == 1
        assert (
            len(await records.list("datasource:by_db_name"))
            == len(await records.list("datasource:by_db_path"))
            == 1
        )
    finally:
        if store is not None:
            await store.aclose()
