"""What the document requires of an answer is what every answer carries.

A field with a default that every answer still sends is required in its
documented schema, so a client generated from the document types it as
always there; the fields an answer leaves out when they say nothing are
the only optional ones. Real answers, whole and streamed, validate against
the schemas with every object closed to the fields it names."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest

from convcore import ChatCompletion, TrimReport
from convcore_scenes.flows import PANEL_FIELDS
from tests.adapters.scenes_support import client, harness
from tests.adapters.server_support import FailingBackend, client_for, make_app, registry_with
from tests.adapters.test_scenes_response_bodies import Checker

pytestmark = pytest.mark.anyio

CHAT = "/api/v2/chat/completions"

# Left out of an answer when they say nothing (see the server's routes_chat,
# stream_wire, health and routes_knowledge, and the scenes' FlowPanel).
OPTIONAL = {
    "ChatCompletion": {"duplicate", "conversation_created", "history_matched", "trim"},
    "ChatCompletionChunk": {"usage", "conversation_created", "history_matched", "trim"},
    "ReplyMessage": {"tool_calls"},
    "Delta": {"role", "content", "tool_calls"},
    "KnowledgeAnswerData": {"usage"},
    "ReadinessCheck": {"error"},
    "FlowPanel": set(PANEL_FIELDS),
}


def _refs(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.add(value.rsplit("/", 1)[-1])
            else:
                _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)
    return found


def _closure(names: set[str], schemas: dict[str, Any]) -> set[str]:
    todo, seen = list(names), set(names)
    while todo:
        for name in _refs(schemas[todo.pop()], set()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_every_answer_schema_requires_all_but_what_it_may_leave_out() -> None:
    """Every model only answers carry (not read from requests too) has
    exactly its listed fields optional: a new answer model, or a new field
    with a default, must say whether every answer sends it."""
    doc = harness().app.openapi()
    schemas = doc["components"]["schemas"]
    operations = [op for item in doc["paths"].values() for op in item.values()]
    read = _closure(set().union(*(_refs(op.get("requestBody", {}), set()) for op in operations)), schemas)
    read |= _closure(set().union(*(_refs(op.get("parameters", []), set()) for op in operations)), schemas)
    answered = _closure(set().union(*(_refs(op.get("responses", {}), set()) for op in operations)), schemas)
    checked = 0
    for name in sorted(answered - read):
        schema = schemas[name]
        if "properties" not in schema:
            continue
        optional = set(schema["properties"]) - set(schema.get("required", ()))
        assert optional == OPTIONAL.get(name, set()), name
        checked += 1
    assert checked > 40 and set(OPTIONAL) <= answered - read


def test_the_library_schemas_still_describe_what_validation_accepts() -> None:
    """Only the answer (serialization) schema changes: a caller validating
    its own data against the models' default schema sees the defaults."""
    assert "created" not in ChatCompletion.model_json_schema()["required"]
    assert "created" in ChatCompletion.model_json_schema(mode="serialization")["required"]
    assert "input_dropped" not in TrimReport.model_json_schema()["required"]


def _events(body: str) -> list[dict[str, Any]]:
    data = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data:")]
    assert data and data[-1] == "[DONE]", body
    return [json.loads(d) for d in data[:-1]]


async def test_real_answers_carry_every_required_field() -> None:
    h = harness()
    check = Checker(h.app.openapi())
    chunk_schema = {"$ref": "#/components/schemas/ChatCompletionChunk", "components": check.components}
    chunk = jsonschema_rs.validator_for(chunk_schema)
    turn = {"model": "test-model", "messages": [{"role": "user", "content": "hello"}]}
    async with client(h.app) as c:
        first = check(await c.post(CHAT, json=turn), "post", CHAT)
        assert first["conversation_created"] is True and first["trim"]["input_dropped"] == 0
        again = {**turn, "conv_uid": first["conv_uid"]}
        second = check(await c.post(CHAT, json=again), "post", CHAT)
        assert "conversation_created" not in second  # said nothing: left out, as documented
        streamed = await c.post(CHAT, json={**again, "stream": True})
        assert streamed.status_code == 200, streamed.text
    events = _events(streamed.text)
    assert len(events) >= 2 and events[-1]["usage"] is not None
    for event in events:
        errors = [str(e).splitlines()[0] for e in chunk.iter_errors(event)]
        assert not errors, (event, errors)
        assert {"object", "created"} <= set(event) and {"index", "finish_reason"} <= set(event["choices"][0])


async def test_an_error_after_the_stream_started_is_the_documented_event() -> None:
    app, _, _ = make_app(registry_with("flaky", FailingBackend()))
    check = Checker(app.openapi())
    event = {"$ref": "#/components/schemas/StreamErrorEvent", "components": check.components}
    validator = jsonschema_rs.validator_for(event)
    async with client_for(app) as c:
        streamed = await c.post(CHAT, json={"messages": "x", "stream": True})
    events = _events(streamed.text)
    failure = events[-1]
    assert failure["success"] is False and failure["text"] == failure["err_msg"], events
    assert not [str(e).splitlines()[0] for e in validator.iter_errors(failure)]
