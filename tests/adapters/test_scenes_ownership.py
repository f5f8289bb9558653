"""Every chat-mode resource has an owner: a key bound to a user lists and
reaches only that user's datasources, spaces, documents, apps and flows;
another user's answer 404 for get, update and delete; operator keys reach all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from convcore import RecordStore
from tests.adapters.scenes_support import CHAT, KEY, Harness, client, harness, scripted
from tests.stores import StoreFactory, all_factory_params

pytestmark = pytest.mark.anyio

SERVE = "/api/v2/serve"


@dataclass(frozen=True)
class Kind:
    """One resource kind's endpoints: how to create, find, update and list it."""

    name: str
    path: str
    body: dict[str, Any]
    update: dict[str, Any]

    def ref(self, data: dict[str, Any]) -> str:
        return str(data.get("id") or data.get("app_code") or data.get("uid"))

    def items(self, data: Any) -> list[dict[str, Any]]:
        if isinstance(data, list):
            return data
        return list(data.get("items") or data.get("app_list") or [])

    def put(self, ref: str) -> tuple[str, dict[str, Any]]:
        if self.name in {"datasource", "space"}:
            key = "id"
            return self.path, {key: int(ref), **self.update}
        return f"{self.path}/{ref}", self.update


KINDS = [
    Kind(
        "datasource",
        f"{SERVE}/datasources",
        {"db_type": "sqlite", "db_name": "alice_db", "db_path": "/tmp/alice-ownership.db"},
        {"comment": "taken over"},
    ),
    Kind("space", f"{SERVE}/knowledge/spaces", {"name": "alice_space"}, {"desc": "taken over"}),
    Kind("app", f"{SERVE}/apps", {"app_name": "alice app", "prompt_template": "secret"}, {"app_name": "x"}),
    Kind(
        "flow",
        f"{SERVE}/awel/flows",
        {"name": "alice_flow", "flow_data": ["Answer: {input}"]},
        {"description": "taken over"},
    ),
]


@pytest.fixture(params=all_factory_params())
async def records(request: pytest.FixtureRequest) -> AsyncIterator[RecordStore]:
    """The records facet of every storage backend, in a fresh namespace."""
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as factory:
        storage = factory.make()
        try:
            yield storage.records
        finally:
            await storage.aclose()
            await factory.cleanup()


@pytest.fixture
async def tenants(records: RecordStore) -> AsyncIterator[tuple[Harness, dict[str, httpx.AsyncClient]]]:
    h = harness(records=records, user_keys={"alice-key": "alice", "bob-key": "bob"})
    made: dict[str, httpx.AsyncClient] = {}
    clients = {
        who: client(h.app, key) for who, key in [("alice", "alice-key"), ("bob", "bob-key"), ("op", KEY)]
    }
    try:
        for who, cm in clients.items():
            made[who] = await cm.__aenter__()
        yield h, made
    finally:
        for cm in clients.values():
            await cm.__aexit__(None, None, None)


def _ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()["data"]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_another_users_resource_is_invisible_and_untouchable(
    kind: Kind, tenants: tuple[Harness, dict[str, httpx.AsyncClient]]
) -> None:
    _, c = tenants
    alices = _ok(await c["alice"].post(kind.path, json=kind.body))
    ref = kind.ref(alices)
    bob_body = {
        **kind.body,
        **{k: f"bob_{v}" for k, v in kind.body.items() if k in {"db_name", "name"}},
        **{k: v.replace("alice", "bob") for k, v in kind.body.items() if k == "db_path"},  # a file of his own
    }
    bobs = _ok(await c["bob"].post(kind.path, json=bob_body))

    # list: each sees only its own; the operator sees both
    assert [kind.ref(i) for i in kind.items(_ok(await c["bob"].get(kind.path)))] == [kind.ref(bobs)]
    assert [kind.ref(i) for i in kind.items(_ok(await c["alice"].get(kind.path)))] == [ref]
    assert {kind.ref(i) for i in kind.items(_ok(await c["op"].get(kind.path)))} == {ref, kind.ref(bobs)}

    # get, update, delete of alice's by bob: 404, and nothing changes
    assert (await c["bob"].get(f"{kind.path}/{ref}")).status_code == 404
    path, body = kind.put(ref)
    assert (await c["bob"].put(path, json=body)).status_code == 404
    assert (await c["bob"].delete(f"{kind.path}/{ref}")).status_code == 404
    kept = _ok(await c["alice"].get(f"{kind.path}/{ref}"))
    assert kept == alices | {k: kept[k] for k in ("updated_at", "gmt_modified") if k in kept}
    assert (alices["user_name"], bobs["user_name"]) == ("alice", "bob")

    # claiming alice as the owner is refused outright
    assert (await c["bob"].post(kind.path, json={**kind.body, "user_name": "alice"})).status_code == 403

    # alice changes and deletes her own; the operator reaches bob's
    assert (await c["alice"].put(path, json=body)).status_code == 200
    assert (await c["alice"].delete(f"{kind.path}/{ref}")).status_code == 200
    assert (await c["op"].get(f"{kind.path}/{kind.ref(bobs)}")).status_code == 200


async def test_documents_follow_their_space(tenants: tuple[Harness, dict[str, httpx.AsyncClient]]) -> None:
    _, c = tenants
    docs = f"{SERVE}/knowledge/documents"
    space = _ok(await c["alice"].post(f"{SERVE}/knowledge/spaces", json={"name": "alice_docs"}))
    doc = _ok(
        await c["alice"].post(docs, json={"space_name": "alice_docs", "content": "alice's secret plan"})
    )
    # bob cannot add to, list, read or delete in alice's space
    added = await c["bob"].post(docs, json={"space_id": space["id"], "content": "planted"})
    assert added.status_code == 404
    assert (await c["bob"].get(docs, params={"space_id": space["id"]})).status_code == 404
    assert _ok(await c["bob"].get(docs))["items"] == []
    assert (await c["bob"].get(f"{docs}/{doc['id']}")).status_code == 404
    assert (await c["bob"].delete(f"{docs}/{doc['id']}")).status_code == 404
    listed = _ok(await c["alice"].get(docs, params={"space_id": space["id"]}))["items"]
    assert [d["id"] for d in listed] == [doc["id"]] and doc["user_name"] == "alice"
    # an operator adding to alice's space adds alice's document
    by_op = _ok(await c["op"].post(docs, json={"space_id": space["id"], "content": "from the operator"}))
    assert by_op["user_name"] == "alice"


async def test_chat_modes_resolve_only_the_callers_resources(
    tenants: tuple[Harness, dict[str, httpx.AsyncClient]], tmp_path: Any
) -> None:
    import sqlite3

    h, c = tenants
    db = tmp_path / "alice.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table secrets(x text)")
        conn.execute("insert into secrets values ('alice-private-row')")
    h.backend.inner = scripted(lambda m: "```sql\nSELECT x FROM secrets\n```").inner
    ds = {"db_type": "sqlite", "db_name": "alice_rows", "db_path": str(db)}
    assert (await c["alice"].post(f"{SERVE}/datasources", json=ds)).status_code == 200
    await c["alice"].post(f"{SERVE}/knowledge/spaces", json={"name": "alice_kb"})
    app = _ok(await c["alice"].post(f"{SERVE}/apps", json={"app_name": "a", "prompt_template": "p"}))
    flow = _ok(await c["alice"].post(f"{SERVE}/awel/flows", json={"name": "f", "flow_data": ["{input}"]}))
    for mode, param in [
        ("chat_data", "alice_rows"),
        ("chat_knowledge", "alice_kb"),
        ("chat_app", app["app_code"]),
        ("chat_flow", flow["uid"]),
    ]:
        turn = {"messages": "show me", "chat_mode": mode, "chat_param": param}
        r = await c["bob"].post(CHAT, json=turn)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_param", (mode, r.text)
        assert (await c["alice"].post(CHAT, json=turn)).status_code == 200, mode

    # A flow of bob's that names alice's datasource in a step reaches nothing either.
    steal = {"name": "steal", "flow_data": [{"scene": "chat_data", "param": "alice_rows"}, "{input}"]}
    bobs = _ok(await c["bob"].post(f"{SERVE}/awel/flows", json=steal))
    r = await c["bob"].post(CHAT, json={"messages": "x", "chat_mode": "chat_flow", "chat_param": bobs["uid"]})
    assert r.status_code == 409 and "alice-private-row" not in r.text


async def test_a_bound_key_cannot_reach_an_ownerless_conversation(
    tenants: tuple[Harness, dict[str, httpx.AsyncClient]],
) -> None:
    _, c = tenants
    conv = _ok_chat(await c["op"].post(CHAT, json={"messages": "the operator's own notes"}))
    path = f"/api/v2/conversations/{conv}"
    assert (await c["bob"].get(path)).status_code == 403
    assert (await c["bob"].post(CHAT, json={"messages": "more", "conv_uid": conv})).status_code == 403
    streamed = await c["bob"].post(CHAT, json={"messages": "more", "conv_uid": conv, "stream": True})
    assert streamed.status_code == 403
    assert (await c["bob"].delete(path)).status_code == 403
    assert conv not in str(_ok(await c["bob"].get("/api/v2/conversations")))
    read = _ok(await c["op"].get(path))
    assert read["conversation"]["message_count"] == 2 and "more" not in str(read["messages"])


def _ok_chat(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["conv_uid"])


async def test_sync_evaluation_and_flow_runs_reach_only_the_callers_own(
    tenants: tuple[Harness, dict[str, httpx.AsyncClient]],
) -> None:
    _, c = tenants
    docs = f"{SERVE}/knowledge/documents"
    space = _ok(await c["alice"].post(f"{SERVE}/knowledge/spaces", json={"name": "alice_eval"}))
    doc = _ok(
        await c["alice"].post(docs, json={"space_id": space["id"], "content": "alice's plan is secret"})
    )
    flow = _ok(
        await c["alice"].post(f"{SERVE}/awel/flows", json={"name": "alice_run", "flow_data": ["{input}"]})
    )
    evaluation = {
        "scene_key": "recall",
        "scene_value": str(space["id"]),
        "datasets": [{"query": "plan", "doc_id": doc["id"]}],
    }
    sync = [{"doc_id": doc["id"], "chunk_parameters": {"chunk_size": 20}}]
    run = f"{SERVE}/awel/flows/{flow['uid']}/run"

    assert (await c["bob"].post(f"{docs}/sync", json=sync)).status_code == 404
    assert (await c["bob"].post(f"{SERVE}/evaluate/evaluation", json=evaluation)).status_code == 404
    assert (await c["bob"].post(run, json={"messages": "hi", "stream": False})).status_code == 404
    assert _ok(await c["alice"].get(f"{docs}/{doc['id']}"))["chunk_size"] != 20  # bob's sync changed nothing

    assert _ok(await c["alice"].post(f"{docs}/sync", json=sync)) == [doc["id"]]
    scores = _ok(await c["alice"].post(f"{SERVE}/evaluate/evaluation", json=evaluation))
    assert [m["score"] for m in scores[0]] == [1.0, 1.0]
    ran = await c["alice"].post(run, json={"messages": "hi", "stream": False})
    assert ran.status_code == 200, ran.text
    assert (await c["op"].post(f"{SERVE}/evaluate/evaluation", json=evaluation)).status_code == 200
