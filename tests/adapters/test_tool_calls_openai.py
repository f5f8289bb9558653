"""Tool calling end to end: the OpenAI SDK's loop against convcore's HTTP
service, whose OpenAI backend talks to the loopback upstream (which, like
OpenAI, refuses a prompt whose tool calls and results are not paired)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from convcore import Engine, GenerationRequest, MemoryStore, ModelRegistry, ModelSpec, PromptMessage
from convcore.models import FunctionCall, ToolCall
from convcore_openai import OpenAIBackend
from convcore_server import create_app
from tests.adapters.server_support import CHAT, KEYS
from tests.backends.fake_upstream import FakeUpstream, get_upstream

pytestmark = pytest.mark.anyio

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def service() -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, FakeUpstream]]:
    upstream = get_upstream()
    backend = OpenAIBackend(upstream.base_url, backoff=0.01)
    registry = ModelRegistry(
        [
            ModelSpec(name="agent", backend=backend, context_window=8192, upstream="echo;tools=2"),
            ModelSpec(
                name="parallel", backend=backend, context_window=8192, upstream="echo;tools=1;parallel=2"
            ),
        ]
    )
    engine = Engine(MemoryStore(), registry, owned=True)
    app = create_app(engine, api_keys=KEYS)
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://convcore.test",
        headers={"Authorization": f"Bearer {KEYS[0]}"},
    )
    # openai 3.x is typed for httpx2 clients but takes httpx ones too.
    client = openai.AsyncOpenAI(
        base_url="http://convcore.test/api/v2",
        api_key=KEYS[0],
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app)),  # type: ignore[arg-type]
    )
    async with client, http, engine:
        yield client, http, upstream


async def ask(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict[str, Any]],
    conv_uid: str | None,
    streaming: bool,
) -> tuple[str | None, list[dict[str, Any]], str, str]:
    """(content, tool calls as dicts, finish_reason, conv_uid) of one SDK call."""
    extra = {"conv_uid": conv_uid} if conv_uid else {}
    if not streaming:
        done = await client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            extra_body=extra,
        )
        message = done.choices[0].message
        calls = [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls or ()]
        return message.content, calls, done.choices[0].finish_reason, (done.model_extra or {})["conv_uid"]
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        stream=True,
        extra_body=extra,
    )
    text: list[str] = []
    by_index: dict[int, dict[str, Any]] = {}
    finish, uid = "", ""
    async for chunk in stream:
        uid = (chunk.model_extra or {}).get("conv_uid") or uid
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            for d in choice.delta.tool_calls or ():
                call = by_index.setdefault(
                    d.index, {"type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["id"] = d.id or call.get("id")
                if d.function is not None:
                    call["function"]["name"] += d.function.name or ""
                    call["function"]["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    calls = [by_index[i] for i in sorted(by_index)]
    return "".join(text) or None, calls, finish, uid


def run_tools(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The client's side of the loop: one result per call."""
    return [
        {
            "role": "tool",
            "tool_call_id": c["id"],
            "content": "result " + json.loads(c["function"]["arguments"])["query"],
        }
        for c in calls
    ]


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_sdk_two_tool_call_loop_continued_by_conv_uid(
    service: tuple[openai.AsyncOpenAI, httpx.AsyncClient, FakeUpstream], streaming: bool
) -> None:
    client, http, upstream = service
    question = f"Find the answer {uuid.uuid4().hex[:6]}"
    content, calls, finish, conv_uid = await ask(
        client, "agent", [{"role": "user", "content": question}], None, streaming
    )
    assert (content, finish) == (None, "tool_calls")
    assert [c["id"] for c in calls] == ["call_1_0"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"query": question, "step": 1, "part": 0}

    content, calls, finish, _ = await ask(client, "agent", run_tools(calls), conv_uid, streaming)
    assert finish == "tool_calls" and [c["id"] for c in calls] == ["call_2_0"]
    content, calls, finish, _ = await ask(client, "agent", run_tools(calls), conv_uid, streaming)
    assert (finish, calls) == ("stop", [])
    assert content == f"Answer from 2 tool results: result {question} | result {question}"

    # The upstream got the whole exchange, calls with their results.
    assert upstream.history[-1].body["tools"] == TOOLS, "the tools parameter goes up with the exchange"
    sent = upstream.history[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "tool"]
    assert sent[1]["content"] is None and sent[1]["tool_calls"][0]["id"] == "call_1_0"
    assert [m.get("tool_call_id") for m in sent if m["role"] == "tool"] == ["call_1_0", "call_2_0"]

    # And the conversation API returns it.
    page = (await http.get(f"/api/v2/conversations/{conv_uid}")).json()["data"]
    roles = [(m["role"], bool(m["tool_calls"]), m["tool_call_id"]) for m in page["messages"]]
    assert roles == [
        ("user", False, None),
        ("assistant", True, None),
        ("tool", False, "call_1_0"),
        ("assistant", True, None),
        ("tool", False, "call_2_0"),
        ("assistant", False, None),
    ]
    assert page["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup"


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_sdk_parallel_tool_calls_answered_out_of_order(
    service: tuple[openai.AsyncOpenAI, httpx.AsyncClient, FakeUpstream], streaming: bool
) -> None:
    client, _, _ = service
    _, calls, finish, conv_uid = await ask(
        client, "parallel", [{"role": "user", "content": "both"}], None, streaming
    )
    assert finish == "tool_calls" and [c["id"] for c in calls] == ["call_1_0", "call_1_1"]
    content, _, finish, _ = await ask(client, "parallel", run_tools(calls)[::-1], conv_uid, streaming)
    assert (content, finish) == ("Answer from 2 tool results: result both | result both", "stop")


async def test_malformed_tool_messages_get_a_400_naming_the_problem(
    service: tuple[openai.AsyncOpenAI, httpx.AsyncClient, FakeUpstream],
) -> None:
    _, http, upstream = service
    before = len(upstream.history)
    orphan = await http.post(
        CHAT,
        json={"model": "agent", "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
    )
    assert orphan.status_code == 400
    assert orphan.json()["error"]["param"] == "messages.0"
    assert "made only of tool results" in orphan.json()["error"]["message"]
    unmatched = await http.post(
        CHAT,
        json={
            "model": "agent",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "call_7", "content": "x"},
            ],
        },
    )
    assert unmatched.status_code == 400
    assert "tool result for tool_call_id 'call_7' has no matching tool call" in unmatched.json()["err_msg"]
    assert len(upstream.history) == before, "nothing reached the model"
    assert (await http.get("/api/v2/conversations")).json()["data"] == []


async def test_backend_sends_and_parses_tool_messages() -> None:
    upstream = get_upstream()
    call = ToolCall(id="call_1_0", function=FunctionCall(name="lookup", arguments='{"query": "q"}'))
    backend = OpenAIBackend(upstream.base_url)
    try:
        request = GenerationRequest(
            model="echo;tools=2",
            messages=(
                PromptMessage(role="user", content="q"),
                PromptMessage(role="assistant", content="", tool_calls=(call,)),
                PromptMessage(role="tool", content="r", tool_call_id="call_1_0"),
            ),
            max_new_tokens=50,
            request_id=uuid.uuid4().hex,
        )
        done = await backend.complete(request)
        assert done.finish_reason == "tool_calls" and done.content == ""
        assert done.tool_calls is not None and [c.id for c in done.tool_calls] == ["call_2_0"]
        chunks = [c async for c in backend.stream(request)]
        assert chunks[-1].tool_calls == done.tool_calls, "argument fragments are put back together"
        assert chunks[-1].finish_reason == "tool_calls"
        body = upstream.exchanges[request.request_id or ""].body
        assert body["messages"][1] == {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump()],
        }
        assert body["messages"][2] == {"role": "tool", "content": "r", "tool_call_id": "call_1_0"}
    finally:
        await backend.aclose()
