"""Every OpenAI chat-completions parameter reaches the model or is refused by name.

The HTTP service fronts two models: ``echo`` on the recording upstream
(an OpenAI-compatible server on loopback, through OpenAIBackend) and the
local model. For each parameter, streamed and not: the upstream's recorded
body holds it exactly as sent, and the stored turn keeps it; the local
model, which cannot honour it, answers 400 naming it and stores nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from convcore import Engine, InvalidRequestError, LocalBackend, MemoryStore, ModelRegistry, ModelSpec
from convcore.model_config import parse_models
from convcore.params import PASS_THROUGH
from convcore.scenes import ScenePlan, SceneRequest
from convcore.tokens import REPLY_PRIMING_TOKENS, count_message, get_tokenizer
from convcore_openai import OpenAIBackend
from convcore_server import create_app
from tests.adapters.server_support import CHAT, KEYS, assert_error_body, assert_valid_sse, client_for, stored
from tests.backends.fake_upstream import Exchange, get_upstream

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}

# One non-default value for every parameter convcore passes through.
PARAMS: dict[str, Any] = {
    "stop": ["\n\n", "END"],
    "top_p": 0.5,
    "seed": 42,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "response_format": {"type": "json_object"},
    "logit_bias": {"1734": -100},
    "user": "user-7",
    "safety_identifier": "hash-of-user-7",
    "prompt_cache_key": "cache-7",
    "prompt_cache_retention": "24h",
    "tools": [TOOL],
    "tool_choice": "none",
    "parallel_tool_calls": False,
    "functions": [TOOL["function"]],
    "function_call": "none",
    "reasoning_effort": "low",
    "verbosity": "low",
    "service_tier": "flex",
    "metadata": {"team": "search"},
    "store": True,
    "modalities": ["text"],
    "prediction": {"type": "content", "content": "You said"},
    "web_search_options": {"search_context_size": "low"},
}
LOCAL_HONOURS = {"stop", "seed", "response_format"}
# What convcore answers itself: one text reply per turn, no log probabilities.
REFUSED: dict[str, Any] = {
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
}
pytestmark = pytest.mark.anyio

STREAM = [pytest.param(False, id="json"), pytest.param(True, id="stream")]


def test_the_table_covers_every_pass_through_parameter() -> None:
    assert set(PARAMS) == set(PASS_THROUGH)


@pytest.fixture
async def served() -> AsyncIterator[tuple[httpx.AsyncClient, Engine]]:
    upstream = get_upstream()
    backend = OpenAIBackend(upstream.base_url, api_key="sk-test", timeout=10, backoff=0.01)
    registry = ModelRegistry(
        [
            ModelSpec(name="echo", backend=backend, context_window=4096, max_new_tokens=256),
            ModelSpec(name="convcore-local", backend=LocalBackend(), context_window=4096),
        ]
    )
    engine = Engine(MemoryStore(), registry)
    async with client_for(create_app(engine, api_keys=KEYS)) as client:
        yield client, engine
    await backend.aclose()


async def _post(client: httpx.AsyncClient, body: dict[str, Any], stream: bool) -> httpx.Response:
    return await client.post(CHAT, json={"messages": "Hello there", "stream": stream, **body})


def _exchange(request_id: str) -> Exchange:
    return get_upstream().exchanges[request_id]


@pytest.mark.parametrize("stream", STREAM)
@pytest.mark.parametrize("name", sorted(PARAMS))
async def test_each_parameter_arrives_at_the_upstream_and_is_kept_with_the_turn(
    served: tuple[httpx.AsyncClient, Engine], name: str, stream: bool
) -> None:
    client, engine = served
    rid = uuid.uuid4().hex
    r = await _post(client, {"model": "echo", "request_id": rid, name: PARAMS[name]}, stream)
    assert r.status_code == 200, r.text
    if stream:
        assert_valid_sse(r.text)
    body = _exchange(rid).body
    assert body[name] == PARAMS[name]
    assert body["stream"] is stream
    turn = await engine.store.get_turn(r.headers["x-conv-uid"], rid)
    assert turn is not None and turn.params == {name: PARAMS[name]}


@pytest.mark.parametrize("stream", STREAM)
async def test_all_parameters_arrive_together(served: tuple[httpx.AsyncClient, Engine], stream: bool) -> None:
    client, _ = served
    rid = uuid.uuid4().hex
    r = await _post(client, {"model": "echo", "request_id": rid, "temperature": 0.3, **PARAMS}, stream)
    assert r.status_code == 200, r.text
    body = _exchange(rid).body
    assert {k: body[k] for k in PARAMS} == PARAMS
    assert body["temperature"] == 0.3


@pytest.mark.parametrize("stream", STREAM)
@pytest.mark.parametrize("name", sorted(set(PARAMS) - LOCAL_HONOURS))
async def test_the_local_model_refuses_what_it_cannot_honour_naming_it(
    served: tuple[httpx.AsyncClient, Engine], name: str, stream: bool
) -> None:
    client, engine = served
    r = await _post(client, {"model": "convcore-local", name: PARAMS[name]}, stream)
    assert r.status_code == 400, r.text
    assert_error_body(r.json(), "invalid_request")
    assert r.json()["error"]["param"] == name
    assert name in r.json()["error"]["message"] and "convcore-local" in r.json()["error"]["message"]
    assert await stored(engine.store) == (0, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", STREAM)
@pytest.mark.parametrize("model", ["echo", "convcore-local"])
@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_what_a_conversation_cannot_keep_is_refused_naming_it(
    served: tuple[httpx.AsyncClient, Engine], name: str, model: str, stream: bool
) -> None:
    client, engine = served
    before = len(get_upstream().history)
    r = await _post(client, {"model": model, name: REFUSED[name]}, stream)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name
    assert len(get_upstream().history) == before  # the upstream was never asked
    assert await stored(engine.store) == (0, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", STREAM)
async def test_the_local_model_honours_stop_seed_and_json(
    served: tuple[httpx.AsyncClient, Engine], stream: bool
) -> None:
    client, _ = served

    async def reply(body: dict[str, Any]) -> str:
        r = await _post(client, {"model": "convcore-local", **body}, stream)
        assert r.status_code == 200, r.text
        if not stream:
            return str(r.json()["choices"][0]["message"]["content"])
        chunks = assert_valid_sse(r.text)
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    assert await reply({}) == "You said: Hello there"
    assert await reply({"stop": "there"}) == "You said: Hello "
    assert await reply({"stop": ["xyz", " Hello"]}) == "You said:"
    assert await reply({"seed": 1}) == await reply({"seed": 1}) == "You said: Hello there"
    assert await reply({"response_format": {"type": "json_object"}}) == '{"reply": "You said: Hello there"}'
    refused = await _post(
        client,
        {"model": "convcore-local", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        stream,
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "response_format"
    assert "json_schema" in refused.json()["error"]["message"]


@pytest.mark.parametrize("stream", STREAM)
async def test_max_completion_tokens_is_sent_under_its_own_name(
    served: tuple[httpx.AsyncClient, Engine], stream: bool
) -> None:
    client, _ = served
    rid = uuid.uuid4().hex
    r = await _post(client, {"model": "echo", "request_id": rid, "max_completion_tokens": 3}, stream)
    assert r.status_code == 200, r.text
    body = _exchange(rid).body
    assert body["max_completion_tokens"] == 3 and "max_tokens" not in body
    usage = r.json()["usage"] if not stream else assert_valid_sse(r.text)[-1]["usage"]
    assert usage["completion_tokens"] == 3


async def test_stream_options_are_answered_by_convcore(served: tuple[httpx.AsyncClient, Engine]) -> None:
    client, _ = served
    rid = uuid.uuid4().hex
    r = await _post(
        client, {"model": "echo", "request_id": rid, "stream_options": {"include_usage": True}}, True
    )
    assert r.status_code == 200, r.text
    assert "usage" in assert_valid_sse(r.text)[-1]
    assert _exchange(rid).body["stream_options"] == {"include_usage": True}  # the backend's own ask
    bad = await _post(client, {"model": "echo", "stream_options": {"include_usage": "yes"}}, True)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("stream", STREAM)
async def test_openai_default_values_are_not_refused_by_the_local_model(
    served: tuple[httpx.AsyncClient, Engine], stream: bool
) -> None:
    """DB-GPT's client always sends these; asking for nothing is honoured anywhere."""
    client, _ = served
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0, "top_p": 1, "logit_bias": {}, "n": 1}
    r = await _post(client, {"model": "convcore-local", "top_k": -1, **neutral}, stream)
    assert r.status_code == 200, r.text


async def test_model_defaults_apply_where_the_request_is_silent() -> None:
    upstream = get_upstream()
    backend = OpenAIBackend(upstream.base_url, api_key="sk-test", timeout=10, backoff=0.01)
    defaults = {"temperature": 0.1, "top_p": 0.3, "seed": 7, "response_format": {"type": "json_object"}}
    spec = ModelSpec(name="echo", backend=backend, context_window=4096, defaults=defaults)
    engine = Engine(MemoryStore(), ModelRegistry([spec]))
    try:
        rid = uuid.uuid4().hex
        reply = await engine.chat({"messages": "hi", "request_id": rid, "seed": 9, "temperature": 0.5})
        body = upstream.exchanges[rid].body
        assert (body["temperature"], body["top_p"], body["seed"]) == (0.5, 0.3, 9)
        assert reply.content == '{"reply": "You said: hi"}'
        turn = await engine.store.get_turn(reply.conv_uid, rid)
        assert turn is not None
        assert turn.params == {
            "top_p": 0.3,
            "seed": 9,
            "response_format": {"type": "json_object"},
            "temperature": 0.5,
        }
        # usage counts the prompt as it was sent, and the reply as the defaults shaped it.
        tok = get_tokenizer("cl100k_base")
        sent = (
            sum(count_message(tok, m["role"], m["content"]) for m in body["messages"]) + REPLY_PRIMING_TOKENS
        )
        assert reply.usage.prompt_tokens == sent
        assert reply.usage.completion_tokens == tok.count(reply.content)
    finally:
        await backend.aclose()


def test_defaults_a_backend_cannot_honour_fail_when_the_models_load() -> None:
    entry = {"name": "m", "backend": "local", "context_window": 4096, "defaults": {"top_p": 0.5}}
    with pytest.raises(InvalidRequestError) as info:
        parse_models([entry])
    assert info.value.field == "models[0].defaults.top_p"
    with pytest.raises(InvalidRequestError) as info:
        parse_models([{**entry, "defaults": {"stop": 5}}])
    assert info.value.field == "models[0].defaults.stop"
    with pytest.raises(InvalidRequestError) as info:
        parse_models([{**entry, "defaults": {"top_k": 5}}])
    assert info.value.field == "models[0].defaults.top_k"
    registry = parse_models([{**entry, "defaults": {"seed": 3, "temperature": 0.2}}])
    assert registry.get("m").defaults == {"seed": 3, "temperature": 0.2}


async def test_an_upstream_that_takes_fewer_parameters_says_so() -> None:
    registry = parse_models(
        [
            {
                "name": "vllm",
                "upstream": "echo",
                "backend": "openai",
                "base_url": get_upstream().base_url,
                "context_window": 4096,
                "supported_params": ["seed", "response_format:json_object"],
            }
        ]
    )
    engine = Engine(MemoryStore(), registry)
    try:
        with pytest.raises(InvalidRequestError) as info:
            await engine.chat({"messages": "hi", "store": True})
        assert info.value.field == "store"
        reply = await engine.chat({"messages": "hi", "seed": 1})
        assert reply.content == "You said: hi"
    finally:
        for backend in registry.backends():
            await backend.aclose()


class _QuizScene:
    """A chat mode with its own prompt, which lets no parameter through."""

    name = "chat_quiz"
    needs_param = False

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        return ScenePlan(system_prompt="Ask one question.")

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        return reply


@pytest.mark.parametrize("stream", STREAM)
async def test_a_chat_mode_refuses_parameters_it_does_not_pass_on(stream: bool) -> None:
    engine = Engine(
        MemoryStore(), ModelRegistry([ModelSpec("m", LocalBackend(), 4096)]), scenes=[_QuizScene()]
    )
    async with client_for(create_app(engine, api_keys=KEYS)) as client:
        r = await _post(client, {"chat_mode": "chat_quiz", "seed": 3}, stream)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed"
        assert "chat_quiz" in r.json()["error"]["message"]
        ok = await _post(client, {"chat_mode": "chat_quiz", "presence_penalty": 0}, stream)
        assert ok.status_code == 200, ok.text
