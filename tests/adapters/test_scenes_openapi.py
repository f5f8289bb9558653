"""The ``/api/v2/serve/...`` routes as their OpenAPI document describes them:
the errors each answers, the links from what creates a record to what uses
its id, and the inputs the document allows being the ones the routes accept
(and answered 4xx, never 5xx, when they are not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from convcore_scenes.flows import FlowIn, FlowRegistry
from convcore_server.cli import build_service, parse_args
from tests.adapters.scenes_support import assert_envelope_error, client, harness

pytestmark = pytest.mark.anyio

SERVE = "/api/v2/serve"
FLOWS = f"{SERVE}/awel/flows"
DS = f"{SERVE}/datasources"
SPACES = f"{SERVE}/knowledge/spaces"
DOCS = f"{SERVE}/knowledge/documents"
APPS = f"{SERVE}/apps"


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        if path.startswith(SERVE)
        for method, op in item.items()
    ]


async def test_every_operation_declares_its_errors_in_the_envelope() -> None:
    doc = harness().app.openapi()
    envelope = doc["components"]["schemas"]["ErrorEnvelope"]
    assert set(envelope["required"]) == {"success", "err_code", "err_msg", "data"}
    for path, method, op in _operations(doc):
        for status in ("400", "401", "500"):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, (method, path, status)
        if "{" in path:
            assert "404" in op["responses"], (method, path)


async def test_creating_operations_link_to_the_operations_that_use_the_id() -> None:
    doc = harness().app.openapi()
    linked: set[tuple[str, str]] = set()
    for _path, _method, op in _operations(doc):
        for link in op["responses"]["200"].get("links", {}).values():
            pointer = link["operationRef"].removeprefix("#/paths/")
            target, method = pointer.rsplit("/", 1)
            target = target.replace("~1", "/").replace("~0", "~")
            assert method in doc["paths"][target], link
            linked.add((method, target))
    assert ("get", f"{APPS}/{{app_code}}") in linked
    assert ("delete", f"{DS}/{{datasource_id}}") in linked
    assert ("get", f"{SPACES}/{{space}}") in linked
    assert ("delete", f"{DOCS}/{{doc_id}}") in linked
    assert ("post", f"{FLOWS}/{{uid}}/run") in linked


async def test_a_flow_step_must_name_a_scene_that_exists_when_it_is_saved() -> None:
    h = harness()
    async with client(h.app) as c:
        unknown = await c.post(FLOWS, json={"name": "f", "flow_data": [{"scene": "chat_nowhere"}]})
        assert "flow_data.0.scene" in assert_envelope_error(unknown, 400)["err_msg"]
        no_param = await c.post(FLOWS, json={"name": "f", "flow_data": [{"scene": "chat_knowledge"}]})
        assert "flow_data.0.param" in assert_envelope_error(no_param, 400)["err_msg"]
        assert (await c.get(FLOWS)).json()["data"]["items"] == []
        # The document lists the scenes a step may name.
        step = h.app.openapi()["paths"][FLOWS]["post"]["requestBody"]["content"]["application/json"]
        kinds = step["schema"]["properties"]["flow_data"]["items"]["anyOf"][1]["not"]["allOf"]
        named = {n for k in kinds for n in k["not"]["properties"].get("scene", {}).get("enum", [])}
        assert {"chat_knowledge", "chat_app", "chat_normal"} <= named and "chat_flow" not in named


async def test_a_stored_flow_that_cannot_run_answers_409_not_400() -> None:
    h = harness()
    # Saved without the scene check (as flows saved before it were).
    unchecked = FlowRegistry(h.kit.records)
    gone = await unchecked.create(FlowIn(name="gone", flow_data=[{"scene": "chat_nowhere"}, "x"]))
    async with client(h.app) as c:
        missing_space = await c.post(
            FLOWS, json={"name": "nospace", "flow_data": [{"scene": "chat_knowledge", "param": "none"}, "x"]}
        )
        assert missing_space.status_code == 200
        for uid in (gone.uid, missing_space.json()["data"]["uid"]):
            r = await c.post(f"{FLOWS}/{uid}/run", json={"messages": "hi", "stream": False})
            assert r.status_code == 409, r.text
    assert await h.store.list_conversations() == []


async def test_a_node_whose_operator_name_is_not_text_is_400() -> None:
    graph = {"nodes": [{"id": "a", "data": {"name": ["convcore_prompt_step"], "parameters": []}}]}
    async with client(harness().app) as c:
        r = await c.post(FLOWS, json={"name": "g", "flow_data": graph})
        assert "nodes[0]" in assert_envelope_error(r, 400)["err_msg"]


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example", "h:5432"])
async def test_a_host_idna_refuses_is_400(host: str) -> None:
    async with client(harness().app) as c:
        r = await c.post(DS, json={"db_type": "mysql", "db_name": "d", "db_host": host})
        assert "db_host" in assert_envelope_error(r, 400)["err_msg"]


async def test_a_host_that_does_not_resolve_is_saved_and_refused_when_queried() -> None:
    h = harness()
    async with client(h.app) as c:
        r = await c.post(DS, json={"db_type": "mysql", "db_name": "later", "db_host": "no-such-host.invalid"})
        assert r.status_code == 200, r.text
        turn = {"messages": "how many?", "chat_mode": "chat_data", "chat_param": "later"}
        refused = await c.post("/api/v2/chat/completions", json=turn)
        assert refused.status_code == 400 and "cannot be resolved" in refused.text


async def test_a_nul_in_a_sqlite_path_is_400() -> None:
    async with client(harness().app) as c:
        r = await c.post(DS, json={"db_type": "sqlite", "db_name": "n", "db_path": "/tmp/a\u0000b.db"})
        assert "db_path" in assert_envelope_error(r, 400)["err_msg"]


async def test_a_space_named_by_a_non_ascii_digit_is_404() -> None:
    async with client(harness().app) as c:
        r = await c.post(DOCS, json={"space_name": "\u00b2", "content": "text"})
        assert_envelope_error(r, 404)
        assert_envelope_error(await c.get(f"{SPACES}/\u00b2"), 404)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (APPS, {"app_name": "a", "keep_first_rounds": False}),
        (APPS, {"app_name": "a", "temperature": True}),
        (DS, {"db_type": "mysql", "db_name": "d", "db_host": "h", "db_port": True}),
        (SPACES, {"name": "s", "id": False}),
        (FLOWS, {"name": "f", "flow_data": [{"prompt": "x", "max_new_tokens": True}]}),
        (FLOWS, {"name": "f", "flow_data": ["x"], "editable": 1}),
    ],
)
async def test_true_and_false_are_not_numbers(path: str, body: dict[str, Any]) -> None:
    async with client(harness().app) as c:
        assert_envelope_error(await c.post(path, json=body), 400)


async def test_an_app_update_with_nulls_keeps_the_fields_that_cannot_be_empty() -> None:
    async with client(harness().app) as c:
        await c.post(APPS, json={"app_code": "a", "app_name": "A", "language": "fr", "model": "m"})
        r = await c.put(f"{APPS}/a", json={"language": None, "app_describe": None, "model": None})
        assert r.status_code == 200, r.text
        assert r.json()["data"]["language"] == "fr" and r.json()["data"]["model"] is None
        assert_envelope_error(await c.put(f"{APPS}/a", json={"app_code": "b"}), 400)


async def test_a_form_may_send_the_document_text_as_its_doc_file_field() -> None:
    async with client(harness().app) as c:
        sid = (await c.post(SPACES, json={"name": "s"})).json()["data"]["id"]
        r = await c.post(DOCS, data={"space_id": str(sid), "doc_file": "The text itself."})
        assert r.status_code == 200, r.text
        assert r.json()["data"]["content"] == "The text itself."


@pytest.mark.parametrize(
    "extra",
    [{"chat_mode": "chat_flow"}, {"chat_param": {}}, {"stream": {}}, {"seed": 1}, {"top_p": 0.5}],
)
async def test_a_run_takes_the_chat_body_its_document_describes(extra: dict[str, Any]) -> None:
    h = harness()
    async with client(h.app) as c:
        uid = (await c.post(FLOWS, json={"name": "f", "flow_data": ["Say {input}"]})).json()["data"]["uid"]
        assert (
            await c.post(f"{FLOWS}/{uid}/run", json={"messages": "hi", "stream": False})
        ).status_code == 200
        refused = await c.post(f"{FLOWS}/{uid}/run", json={"messages": "hi", "stream": False, **extra})
        assert next(iter(extra)) in assert_envelope_error(refused, 400)["err_msg"]
        schema = h.app.openapi()["paths"][f"{FLOWS}/{{uid}}/run"]["post"]["requestBody"]["content"]
        rules = schema["application/json"]["schema"]["allOf"][1:]
        assert {
            "if": {"required": ["chat_mode"]},
            "then": {"properties": {"chat_mode": {"type": "null"}}},
        } in rules


async def test_a_document_may_come_as_an_urlencoded_form_with_empty_fields_left_out() -> None:
    h = harness()
    async with client(h.app) as c:
        sid = (await c.post(SPACES, json={"name": "s"})).json()["data"]["id"]
        form = {"space_id": str(sid), "space_name": "", "doc_name": "", "content": "Plain text."}
        r = await c.post(DOCS, data=form)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["content"] == "Plain text."
        body = h.app.openapi()["paths"][DOCS]["post"]["requestBody"]["content"]
        assert set(body) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}


async def test_the_public_document_does_not_name_the_sqlite_roots(tmp_path: Path) -> None:
    root = tmp_path / "private_sqlite_root_7f3a"
    root.mkdir()
    argv = ["--api-key", "k", "--store", f"sqlite:///{tmp_path / 'store.db'}", "--sqlite-root", str(root)]
    app, engine, _ = build_service(parse_args(argv, environ={}))
    path = {"db_type": "sqlite", "db_name": "shop"}
    async with engine, client(app, key=None) as anonymous, client(app, key="k") as c:
        doc = await anonymous.get("/openapi.json")
        outside = await c.post(DS, json={**path, "db_path": str(tmp_path / "outside.db")})
        listed = await c.get(DS)
        inside = await c.post(DS, json={**path, "db_path": str(root / "shop.db")})
    assert doc.status_code == 200 and "db_path" in doc.text
    assert [leak for leak in (root.name, str(tmp_path)) if leak in doc.text] == []
    assert "outside the directories allowed for SQLite" in assert_envelope_error(outside, 400)["err_msg"]
    assert listed.json()["data"] == []
    assert inside.status_code == 200, inside.text
