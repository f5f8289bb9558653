"""What the OpenAPI document says a success answers is what is sent.

Every 2xx JSON answer of the app names its body (no untyped ``{}``, no
untyped envelope ``data``), and every ``/api/v2/serve/...`` operation's
answer validates against its declared schema with each object closed to
the fields it names: a field sent but not declared, or declared with another
type or nullability, fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from convcore_scenes.envelope import Page, page_of
from convcore_scenes.flows import PANEL_FIELDS
from convcore_scenes.routes_flows import FlowPanel
from tests.adapters.scenes_support import client, harness

pytestmark = pytest.mark.anyio

SERVE = "/api/v2/serve"
REF = "#/components/schemas/"


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].removeprefix(REF)]
    return schema


def _success_schemas(doc: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [
        (method, path, status, response["content"]["application/json"]["schema"])
        for path, item in doc["paths"].items()
        for method, op in item.items()
        for status, response in op["responses"].items()
        if status.startswith("2") and "application/json" in response.get("content", {})
    ]


def test_no_success_answer_of_the_app_is_untyped() -> None:
    doc = harness().app.openapi()
    found = _success_schemas(doc)
    assert len(found) > 30
    for method, path, status, schema in found:
        assert schema, (method, path, status)
        body = _resolve(doc, schema)
        assert body.get("type") == "object" or "anyOf" in body or "items" in body, (method, path, body)
        data = body.get("properties", {}).get("data")
        if data is not None:
            assert data not in ({}, {"title": "Data"}), (method, path)


def test_the_paged_list_model_has_page_ofs_fields() -> None:
    assert list(Page.model_fields) == list(page_of([], 1, 20))


def test_a_flow_panel_declares_each_panel_field() -> None:
    assert set(PANEL_FIELDS) <= set(FlowPanel.model_fields)


def _closed(node: Any) -> Any:
    """``node`` with every object schema that lists its properties refusing others."""
    if isinstance(node, list):
        return [_closed(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: (_closed(v) if k != "properties" else {p: _closed(s) for p, s in v.items()})
        for k, v in node.items()
    }
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


class Checker:
    """Validates answers against the document, remembering the operations seen."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components = _closed(doc["components"])
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, response: httpx.Response, method: str, path: str) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        schema = self.doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        validator = jsonschema_rs.validator_for({**_closed(schema), "components": self.components})
        body: dict[str, Any] = response.json()
        errors = [str(e).splitlines()[0] for e in validator.iter_errors(body)]
        assert not errors, (method, path, errors)
        self.seen.add((method, path))
        return body


async def test_every_serve_operation_answers_exactly_its_declared_body(tmp_path: Path) -> None:
    h = harness()
    doc = h.app.openapi()
    check = Checker(doc)
    apps, spaces, docs, ds = (
        f"{SERVE}/apps",
        f"{SERVE}/knowledge/spaces",
        f"{SERVE}/knowledge/documents",
        f"{SERVE}/datasources",
    )
    flows = f"{SERVE}/awel/flows"
    async with client(h.app) as c:
        # apps
        check(await c.post(apps, json={"app_code": "a", "app_name": "A", "temperature": 0.5}), "post", apps)
        await c.post(apps, json={"app_name": "B"})
        page = check(await c.get(apps, params={"page": 2, "page_size": 1}), "get", apps)["data"]
        assert page["total_count"] == 2 and page["total_page"] == 2 and len(page["app_list"]) == 1
        one = f"{apps}/{{app_code}}"
        check(await c.get(f"{apps}/a"), "get", one)
        check(await c.put(f"{apps}/a", json={"language": "fr"}), "put", one)
        check(await c.put(apps, json={"app_code": "a", "icon": "i"}), "put", apps)
        check(await c.delete(f"{apps}/a"), "delete", one)

        # knowledge
        sid = check(await c.post(spaces, json={"name": "docs"}), "post", spaces)["data"]["id"]
        check(await c.put(spaces, json={"id": sid, "desc": "d"}), "put", spaces)
        check(await c.get(spaces), "get", spaces)
        check(await c.get(f"{spaces}/docs"), "get", f"{spaces}/{{space}}")
        text = {
            "space_id": sid,
            "doc_name": "faq",
            "content": "Shops open at nine. Returns take thirty days.",
        }
        doc_id = check(await c.post(docs, json=text), "post", docs)["data"]["id"]
        upload = {"doc_file": ("notes.txt", b"Shipping takes two days.", "text/plain")}
        uploaded = check(await c.post(docs, data={"space_id": str(sid)}, files=upload), "post", docs)
        assert uploaded["data"]["doc_source"] == "notes.txt"
        listed = check(await c.get(docs, params={"space_id": sid}), "get", docs)["data"]
        assert listed["total_count"] == 2 and listed["items"][0]["content"] == ""
        one_doc = f"{docs}/{{doc_id}}"
        check(await c.get(f"{docs}/{doc_id}"), "get", one_doc)
        synced = [{"doc_id": doc_id, "chunk_parameters": {"chunk_size": 40}}]
        assert check(await c.post(f"{docs}/sync", json=synced), "post", f"{docs}/sync")["data"] == [doc_id]
        evaluation = {
            "scene_key": "recall",
            "scene_value": sid,
            "datasets": [{"query": "when do shops open", "doc_name": "faq", "note": "kept"}],
        }
        evaluated = check(
            await c.post(f"{SERVE}/evaluate/evaluation", json=evaluation),
            "post",
            f"{SERVE}/evaluate/evaluation",
        )
        assert evaluated["average_score"]["RetrieverHitRateMetric"] == 1.0
        check(await c.delete(f"{docs}/{doc_id}"), "delete", one_doc)
        check(await c.delete(f"{spaces}/{sid}"), "delete", f"{spaces}/{{space}}")

        # datasources
        db = {"db_type": "sqlite", "db_name": "local", "db_path": str(tmp_path / "local.db")}
        ds_id = check(await c.post(ds, json=db), "post", ds)["data"]["id"]
        check(await c.put(ds, json={"id": ds_id, "comment": "c"}), "put", ds)
        check(await c.get(ds), "get", ds)
        check(await c.get(f"{ds}/{ds_id}"), "get", f"{ds}/{{datasource_id}}")
        check(await c.delete(f"{ds}/{ds_id}"), "delete", f"{ds}/{{datasource_id}}")

        # flows: from steps (with DB-GPT's panel fields), and from the node graph that answer drew
        panel = {"source": "local", "version": "0.1", "authors": ["me"], "variables": [{"name": "v"}]}
        steps = {"name": "f", "flow_data": ["Say {input}", {"scene": "chat_normal", "name": "chat"}], **panel}
        made = check(await c.post(flows, json=steps), "post", flows)["data"]
        assert {k: made[k] for k in panel} == panel and "error_message" not in made
        graph = {"name": "g", "flow_data": made["flow_data"]}
        uid = check(await c.post(flows, json=graph), "post", flows)["data"]["uid"]
        one_flow = f"{flows}/{{uid}}"
        check(await c.get(f"{flows}/{uid}"), "get", one_flow)
        check(await c.put(f"{flows}/{uid}", json={"description": "d", "error_message": ""}), "put", one_flow)
        check(await c.get(flows, params={"page_size": 1}), "get", flows)
        run = await c.post(f"{flows}/{uid}/run", json={"messages": "hi", "stream": False})
        check(run, "post", f"{one_flow}/run")
        check(await c.delete(f"{flows}/{uid}"), "delete", one_flow)
        assert len(check(await c.get(f"{SERVE}/awel/nodes"), "get", f"{SERVE}/awel/nodes")["data"]) == 2

    serve = {(method, path) for method, path, _, _ in _success_schemas(doc) if path.startswith(SERVE)}
    assert serve == check.seen
