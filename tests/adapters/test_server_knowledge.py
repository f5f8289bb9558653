"""POST /api/knowledge/chat/completions: the knowledge-base API's envelope and numbered codes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI

from convcore import (
    BackendRateLimitedError,
    Generation,
    GenerationChunk,
    GenerationRequest,
    ModelRegistry,
    ModelSpec,
)
from convcore.testing import RecordingBackend
from convcore_server.routes_knowledge import build_knowledge_router
from tests.adapters.server_support import (
    FailingBackend,
    client_for,
    make_app,
    registry_with,
    sse_data,
    stored,
)

pytestmark = pytest.mark.anyio

KB = "/api/knowledge/chat/completions"
DOCUMENTED_BODY = {
    "model": "convcore-local",
    "max_tokens": 4096 - 4000,
    "temperature": 0.1,
    "messages": [
        {"role": "system", "content": "prompt template"},
        {"role": "user", "content": "history content"},
        {"role": "assistant", "content": "history answer"},
        {"role": "user", "content": "question"},
    ],
    "stream": False,
    "return_token_usage": True,
}


async def test_success_envelope_with_usage_as_a_json_string() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.post(KB, json=DOCUMENTED_BODY)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"code", "message", "request_id", "data"}
    assert (body["code"], body["message"]) == (0, "success")
    assert body["data"]["generated_answer"] == (
        "You said: question (earlier user messages: 1; first: 'history content')"
    )
    usage = body["data"]["usage"]
    assert isinstance(usage, str) and usage.endswith("\n")
    counts = json.loads(usage)
    assert counts["total_tokens"] == counts["prompt_tokens"] + counts["completion_tokens"] > 0
    assert body["data"]["conv_uid"] == r.headers["x-conv-uid"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "x", "model": "Doubao-pro-32k"}, "unknown model"),
        ({"messages": "x", "temperature": "warm"}, "temperature"),
    ],
)
async def test_invalid_requests_are_1000003(body: dict[str, object], reason: str) -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(KB, json=body)
        junk = await c.post(KB, content=b"not json")
    for resp in (r, junk):
        assert resp.status_code == 400
        assert resp.json()["code"] == 1000003
        assert resp.json()["message"].startswith("invalid request:")
        assert resp.json()["request_id"]
    assert reason in r.json()["message"]
    assert await stored(store) == (0, 0)


async def test_another_users_conversation_is_1000002() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        first = await c.post(KB, json={"messages": "x", "user_name": "ada"})
        conv_uid = first.json()["data"]["conv_uid"]
        r = await c.post(KB, json={"messages": "y", "user_name": "bob", "conv_uid": conv_uid})
    assert r.status_code == 403
    assert (r.json()["code"], r.json()["message"]) == (1000002, "no permission")


async def test_streamed_envelopes_then_done() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.post(KB, json={**DOCUMENTED_BODY, "stream": True})
    data = sse_data(r.text)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    events = [json.loads(d) for d in data[:-1]]
    assert all(e["code"] == 0 for e in events)
    assert "".join(e["data"]["generated_answer"] for e in events).startswith("You said: question")
    assert "usage" in events[-1]["data"] and all("usage" not in e["data"] for e in events[:-1])


async def test_backend_failure_keeps_its_status() -> None:
    app, _, _ = make_app(registry_with("flaky", FailingBackend()))
    async with client_for(app) as c:
        r = await c.post(KB, json={"messages": "x"})
        s = await c.post(KB, json={"messages": "x", "stream": True})
    assert r.status_code == 502 and r.json()["code"] == 502
    assert r.json()["message"].startswith("backend_error:")
    last = json.loads(sse_data(s.text)[-2])
    assert last["code"] == 502


class RateLimited:
    """A backend whose upstream rate-limits every call, before any token."""

    async def complete(self, request: GenerationRequest) -> Generation:
        raise BackendRateLimitedError("upstream answered 429: slow down")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        raise BackendRateLimitedError("upstream answered 429: slow down")
        yield GenerationChunk()  # pragma: no cover - makes this a generator

    async def aclose(self) -> None:
        return None


async def test_a_stream_failing_before_its_first_token_gets_the_envelope_and_status_unstreamed() -> None:
    app, _, store = make_app(registry_with("limited", RateLimited()))
    async with client_for(app) as c:
        whole = await c.post(KB, json={"messages": "x"})
        streamed = await c.post(KB, json={"messages": "x", "stream": True})
    assert streamed.status_code == whole.status_code == 429
    assert streamed.headers["content-type"] == "application/json"
    assert {k: v for k, v in streamed.json().items() if k != "request_id"} == {
        "code": 429,
        "message": "rate_limit_exceeded:upstream answered 429: slow down",
    }
    assert {k: v for k, v in whole.json().items() if k != "request_id"} == {
        k: v for k, v in streamed.json().items() if k != "request_id"
    }
    assert await stored(store) == (0, 0)


def _recording_app() -> tuple[Any, RecordingBackend]:
    backend = RecordingBackend()
    models = ModelRegistry([ModelSpec("convcore-local", backend, context_window=16384, max_new_tokens=256)])
    app, _, _ = make_app(models)
    return app, backend


async def test_the_apis_documented_defaults_are_applied() -> None:
    app, backend = _recording_app()
    async with client_for(app) as c:
        r = await c.post(KB, json={"messages": "x"})
        zero = await c.post(KB, json={"messages": "x", "max_tokens": 0, "temperature": 0})
        given = await c.post(KB, json={"messages": "x", "max_tokens": 4096, "temperature": 1})
    assert [x.status_code for x in (r, zero, given)] == [200, 200, 200]
    sent = [(q.max_new_tokens, q.temperature) for q in backend.requests]
    assert sent == [(4096, 0.1), (4096, 0), (4096, 1)]


async def test_the_default_reply_budget_leaves_a_small_model_room_to_answer() -> None:
    backend = RecordingBackend()
    app, _, _ = make_app(ModelRegistry([ModelSpec("small", backend, context_window=2048, max_new_tokens=64)]))
    async with client_for(app) as c:
        r = await c.post(KB, json={"messages": "x"})
    assert r.status_code == 200, r.text
    assert backend.requests[-1].max_new_tokens == 1024


async def test_max_tokens_0_beside_max_new_tokens_means_max_new_tokens() -> None:
    # 0 is in the API's range (it means "the default"); max_new_tokens is that default here.
    app, backend = _recording_app()
    async with client_for(app) as c:
        r = await c.post(KB, json={"messages": "x", "max_tokens": 0, "max_new_tokens": 100})
    assert r.status_code == 200, r.text
    assert backend.requests[-1].max_new_tokens == 100


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 1.5),
        ("temperature", -0.1),
        ("temperature", True),
        ("max_tokens", 5000),
        ("max_tokens", -1),
        ("max_tokens", 10.5),
        ("return_token_usage", "no"),
    ],
)
async def test_values_outside_the_apis_ranges_are_1000003(field: str, value: object) -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(KB, json={"messages": "x", field: value})
    assert r.status_code == 400
    assert r.json()["code"] == 1000003 and field in r.json()["message"]
    assert await stored(store) == (0, 0)


async def test_return_token_usage_false_leaves_usage_out() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        plain = await c.post(KB, json={**DOCUMENTED_BODY, "return_token_usage": False})
        streamed = await c.post(KB, json={**DOCUMENTED_BODY, "return_token_usage": False, "stream": True})
        default = await c.post(KB, json={"messages": "x"})
    assert set(plain.json()["data"]) == {"generated_answer", "conv_uid"}
    events = [json.loads(d) for d in sse_data(streamed.text)[:-1]]
    assert events and all("usage" not in e["data"] for e in events)
    assert "".join(e["data"]["generated_answer"] for e in events) == plain.json()["data"]["generated_answer"]
    assert "usage" in default.json()["data"]


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_other_methods_are_405_in_the_apis_envelope(method: str) -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.request(method, KB)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    body = r.json()
    assert set(body) == {"code", "message", "request_id"}
    assert body["code"] == 405 and method in body["message"] and body["request_id"]


async def test_every_envelope_carries_the_requests_x_request_id() -> None:
    app, _, _ = make_app()
    flaky, _, _ = make_app(registry_with("flaky", FailingBackend()))
    sent = {"X-Request-Id": "req-kb-1"}
    async with client_for(app) as c, client_for(flaky) as f, client_for(app, key=None) as anonymous:
        answers = [
            await c.post(KB, json={"messages": "x"}, headers=sent),
            await c.post(KB, json={"messages": []}, headers=sent),
            await anonymous.post(KB, json={"messages": "x"}, headers=sent),
            await c.get(KB, headers=sent),
        ]
        streamed = await c.post(KB, json={"messages": "x", "stream": True}, headers=sent)
        broken = await f.post(KB, json={"messages": "x", "stream": True}, headers=sent)
    assert [r.status_code for r in answers] == [200, 400, 401, 405]
    assert [r.json()["request_id"] for r in answers] == ["req-kb-1"] * 4
    for r in (streamed, broken):
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-kb-1"
        events = [json.loads(d) for d in sse_data(r.text)[:-1]]
        assert len(events) > 1 and {e["request_id"] for e in events} == {"req-kb-1"}
    assert json.loads(sse_data(broken.text)[-2])["code"] == 502


async def test_without_a_client_id_the_envelope_carries_the_one_the_response_header_names() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        whole = await c.post(KB, json={"messages": "x"})
        conv_uid = whole.json()["data"]["conv_uid"]
        streams = [
            await c.post(KB, json={"messages": "y", "conv_uid": conv_uid, "stream": True}) for _ in "ab"
        ]
        error = await c.post(KB, json={"messages": "x", "temperature": 9})
    for r in (whole, error):
        assert r.json()["request_id"] == r.headers["x-request-id"]
    ids = []
    for r in streams:
        events = [json.loads(d) for d in sse_data(r.text)[:-1]]
        assert {e["request_id"] for e in events} == {r.headers["x-request-id"]}
        ids.append(r.headers["x-request-id"])
    assert ids[0] != ids[1]


async def test_mounted_without_the_service_one_stream_keeps_one_request_id() -> None:
    app, _, _ = make_app()
    bare = FastAPI()
    bare.include_router(build_knowledge_router(app.state.convcore))
    async with client_for(bare) as c:
        streams = [
            await c.post(KB, json={"messages": "x", "conv_uid": "kb-bare", "stream": True}) for _ in "ab"
        ]
    ids = [{json.loads(d)["request_id"] for d in sse_data(r.text)[:-1]} for r in streams]
    assert [len(one) for one in ids] == [1, 1] and ids[0] != ids[1]
