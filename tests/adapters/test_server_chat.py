"""POST /api/v2/chat/completions in-process: shapes, streams, conversations, clients."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import openai
import pytest
from starlette.types import Message

from convcore import Generation, GenerationChunk, GenerationRequest
from tests.adapters.server_support import (
    CHAT,
    KEYS,
    FailingBackend,
    GateBackend,
    assert_error_body,
    assert_valid_sse,
    client_for,
    make_app,
    registry_with,
    stored,
)

pytestmark = pytest.mark.anyio

# What DB-GPT's client (dbgpt-client 0.8.2) sends: every field, nulls included.
DBGPT_BODY: dict[str, Any] = {
    "model": "convcore-local",
    "messages": "hello",
    "temperature": None,
    "top_p": None,
    "top_k": -1,
    "n": 1,
    "max_tokens": None,
    "stop": None,
    "stream": False,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "user": None,
    "chat_mode": None,
    "chat_param": None,
    "conv_uid": None,
    "span_id": None,
    "sys_code": None,
    "user_name": None,
    "max_new_tokens": None,
    "context": None,
    "incremental": True,
    "enable_vis": True,
}


async def test_non_streaming_answer_has_dbgpts_shape_and_conv_uid() -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "Hello", "model": "convcore-local"})
    assert r.status_code == 200
    body = r.json()
    dbgpt_shape = {"id", "object", "created", "model", "choices", "usage", "conv_uid"}
    assert set(body) == dbgpt_shape | {"conversation_created", "trim"}  # the extension fields
    assert body["conversation_created"] is True and r.headers["x-conversation-created"] == "true"
    assert body["trim"]["history_messages"] == 0 and body["trim"]["prompt_seqs"] == []
    assert body["object"] == "chat.completion"
    assert body["model"] == "convcore-echo", "the echo model's old name still answers"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "You said: Hello"},
        "finish_reason": "stop",
    }
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert r.headers["x-conv-uid"] == body["conv_uid"]
    assert await stored(store) == (1, 2)


async def test_stream_is_json_chunks_then_done_with_usage_last() -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "Hello", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = assert_valid_sse(r.text)
    conv_uid = r.headers["x-conv-uid"]
    for chunk in chunks:
        assert {"id", "object", "created", "model", "choices", "conv_uid"} <= set(chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["conv_uid"] == conv_uid
        assert chunk["choices"][0]["index"] == 0
        assert set(chunk["choices"][0]["delta"]) <= {"role", "content"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert (
        last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "You said: Hello"
    assert await stored(store) == (1, 2)


async def test_stream_survives_line_separators_in_the_reply() -> None:
    # U+2028 / U+0085 split lines for splitlines()-style readers unless escaped.
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "a\u2028b\x85c\rd", "stream": True})
    chunks = assert_valid_sse(r.text)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "You said: a\u2028b\x85c\rd"


@pytest.mark.parametrize("stream", [False, True])
async def test_three_turns_by_conv_uid_use_the_earlier_turns(stream: bool) -> None:
    app, _, store = make_app()

    async def ask(c: httpx.AsyncClient, text: str, conv_uid: str | None) -> tuple[str, str]:
        r = await c.post(CHAT, json={"messages": text, "conv_uid": conv_uid, "stream": stream})
        assert r.status_code == 200
        if not stream:
            return r.json()["conv_uid"], r.json()["choices"][0]["message"]["content"]
        chunks = assert_valid_sse(r.text)
        return chunks[-1]["conv_uid"], "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)

    async with client_for(app) as c:
        conv_uid, first = await ask(c, "Hi, I am Ada.", None)
        assert first == "You said: Hi, I am Ada."
        same, second = await ask(c, "What is a window?", conv_uid)
        assert same == conv_uid
        assert "earlier user messages: 1; first: 'Hi, I am Ada.'" in second
        _, third = await ask(c, "What is my name?", conv_uid)
        assert "earlier user messages: 2; first: 'Hi, I am Ada.'" in third
    assert await stored(store) == (1, 6)


async def test_dbgpt_client_body_with_nulls_is_accepted() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json=DBGPT_BODY)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "You said: hello"
        r = await c.post(CHAT, json={**DBGPT_BODY, "stream": True})
        assert r.status_code == 200
        assert_valid_sse(r.text)


async def test_a_message_list_is_honoured_whole() -> None:
    app, _, _ = make_app()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "question"}],
        },
    ]
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": messages})
    assert r.json()["choices"][0]["message"]["content"] == (
        "You said: second question (earlier user messages: 1; first: 'first question')"
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_new_tokens"])
async def test_max_tokens_and_max_new_tokens_both_cut_the_reply(field: str) -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "a long enough question", field: 2})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


async def test_idempotency_key_header_answers_a_retry_from_the_store() -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        headers = {"Idempotency-Key": "retry-1"}
        one = await c.post(CHAT, json={"messages": "once"}, headers=headers)
        two = await c.post(CHAT, json={"messages": "once"}, headers=headers)
    assert one.status_code == two.status_code == 200
    assert one.json()["id"] == two.json()["id"]
    assert one.json()["conv_uid"] == two.json()["conv_uid"]
    assert two.json()["duplicate"] is True
    assert await stored(store) == (1, 2)


async def test_an_error_before_the_stream_starts_is_a_json_4xx() -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "x", "model": "nope", "stream": True})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert_error_body(r.json(), "model_not_found")
    assert await stored(store) == (0, 0)


async def test_an_error_mid_stream_is_one_error_event_not_a_chunk_then_done_and_nothing_stored() -> None:
    app, _, store = make_app(registry_with("flaky", FailingBackend()))
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "x", "stream": True})
    assert r.status_code == 200
    chunks = assert_valid_sse(r.text)
    last = chunks[-1]
    assert_error_body(last, "backend_error")
    assert "upstream exploded" in last["err_msg"] and last["text"] == last["err_msg"]
    # Not a chunk: no client may read it as a finished (empty) answer.
    assert "choices" not in last and "id" not in last
    assert last["conv_uid"] == r.headers["x-conv-uid"]
    assert await stored(store) == (0, 0)


async def test_a_backend_failure_without_stream_is_a_json_502() -> None:
    app, _, store = make_app(registry_with("flaky", FailingBackend()))
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "x"})
    assert r.status_code == 502
    assert_error_body(r.json(), "backend_error")
    assert await stored(store) == (0, 0)


def _scope(body: bytes, spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"convcore.test"),
            (b"authorization", f"Bearer {KEYS[1]}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 5670),
    }


@pytest.mark.parametrize("how", ["disconnect-message", "send-raises"])
async def test_client_disconnect_mid_stream_closes_the_turn_and_stores_nothing(how: str) -> None:
    backend = GateBackend()
    app, _, store = make_app(registry_with("gate", backend))
    body = json.dumps({"messages": "hi", "stream": True}).encode()
    gone = anyio.Event()
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set() and how == "send-raises":
            raise OSError("connection reset")
        sent.append(message)
        if b'"content":"Hello"' in message.get("body", b""):
            gone.set()

    with anyio.fail_after(5):
        await app(_scope(body, "2.3" if how == "disconnect-message" else "2.4"), receive, send)
    assert backend.closed
    assert sent[0]["status"] == 200
    assert not any(b"[DONE]" in m.get("body", b"") for m in sent)
    assert await stored(store) == (0, 0)


async def test_openai_async_sdk_in_process_stream_and_not() -> None:
    app, _, store = make_app()
    # openai 3.x is typed for httpx2 clients but takes httpx ones too (as the brief asks).
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    async with openai.AsyncOpenAI(
        base_url="http://convcore.test/api/v2",
        api_key=KEYS[1],
        http_client=http_client,  # type: ignore[arg-type]
    ) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["convcore-echo"]

        first = await client.chat.completions.create(
            model="convcore-echo",
            messages=[{"role": "user", "content": "Hi, I am Ada."}],
            max_tokens=64,
            extra_body={"chat_mode": "chat_normal"},
        )
        assert first.choices[0].message.content == "You said: Hi, I am Ada."
        assert first.usage is not None and first.usage.total_tokens > 0
        conv_uid = (first.model_extra or {})["conv_uid"]

        stream = await client.chat.completions.create(
            model="convcore-echo",
            messages=[{"role": "user", "content": "Again?"}],
            stream=True,
            extra_body={"conv_uid": conv_uid, "chat_mode": "chat_normal"},
        )
        parts = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert "".join(parts) == "You said: Again? (earlier user messages: 1; first: 'Hi, I am Ada.')"
        assert usage is not None and usage.completion_tokens > 0
    assert await stored(store) == (1, 4)


async def test_openai_sdk_raises_on_an_error_chunk() -> None:
    app, _, _ = make_app(registry_with("flaky", FailingBackend()))
    # openai 3.x is typed for httpx2 clients but takes httpx ones too (as the brief asks).
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    async with openai.AsyncOpenAI(
        base_url="http://convcore.test/api/v2",
        api_key=KEYS[0],
        http_client=http_client,  # type: ignore[arg-type]
    ) as client:
        stream = await client.chat.completions.create(
            model="flaky", messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError, match="upstream exploded"):
            async for _ in stream:
                pass
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert err.value.code == "model_not_found"


async def test_models_list_has_context_windows() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.get("/api/v2/models")
        one = await c.get("/api/v2/models/convcore-local")
        missing = await c.get("/api/v2/models/nope")
    assert r.json() == {"object": "list", "data": [one.json()]}
    assert set(one.json()) == {"id", "object", "created", "owned_by", "context_window", "max_new_tokens"}
    assert one.json()["context_window"] == 8192
    assert missing.status_code == 404
    assert_error_body(missing.json(), "model_not_found")


async def test_health_needs_no_key() -> None:
    app, _, _ = make_app()
    async with client_for(app, key=None) as c:
        r = await c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


class SilentBackend:
    """Never produces a first token; records that its stream was closed."""

    def __init__(self) -> None:
        self.closed = False
        self.started = anyio.Event()

    async def complete(self, request: GenerationRequest) -> Generation:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        try:
            self.started.set()
            await anyio.sleep_forever()
            yield GenerationChunk()  # pragma: no cover - makes this a generator
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


async def test_a_client_leaving_before_the_first_token_closes_the_backend_and_gets_no_200() -> None:
    backend = SilentBackend()
    app, _, store = make_app(registry_with("silent", backend))
    body = json.dumps({"messages": "hi", "stream": True}).encode()
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await backend.started.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(_scope(body, "2.4"), receive, send)
    assert backend.closed
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert await stored(store) == (0, 0)


async def test_every_stream_chunk_id_is_the_conv_uid() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={**DBGPT_BODY, "stream": True, "messages": "Hi there"})
        chunks = assert_valid_sse(r.text)
        conv_uid = r.headers["x-conv-uid"]
        assert len(chunks) > 2 and {ch["id"] for ch in chunks} == {conv_uid}
        # The turn's own id stays readable (the non-streaming answer's id).
        assert len({ch["turn_id"] for ch in chunks}) == 1 and chunks[0]["turn_id"] != conv_uid
        # A DB-GPT client continues with the id it read.
        again = await c.post(
            CHAT, json={**DBGPT_BODY, "stream": True, "messages": "More", "conv_uid": conv_uid}
        )
        assert {ch["id"] for ch in assert_valid_sse(again.text)} == {conv_uid}
        assert (await c.get(f"/api/v2/conversations/{conv_uid}")).json()["data"]["conversation"][
            "message_count"
        ] == 4


async def test_incremental_false_streams_the_whole_text_so_far() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        body = {**DBGPT_BODY, "stream": True, "messages": "one two three four", "incremental": False}
        cumulative = assert_valid_sse((await c.post(CHAT, json=body)).text)
        pieces = assert_valid_sse((await c.post(CHAT, json={**body, "incremental": True})).text)
    texts = [ch["choices"][0]["delta"]["content"] for ch in cumulative]
    full = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in pieces)
    assert full == "You said: one two three four"
    assert texts[-1] == full and len(texts) == len(pieces) > 3
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert cumulative[-1]["choices"][0]["finish_reason"] == "stop" and "usage" in cumulative[-1]


async def test_dbgpts_chat_model_spelling_is_the_chat_mode() -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        normal = await c.post(CHAT, json={"messages": "x", "chat_model": "chat_normal"})
        assert normal.status_code == 200
        unknown = await c.post(CHAT, json={"messages": "x", "chat_model": "chat_knowledge"})
        both = await c.post(
            CHAT, json={"messages": "x", "chat_model": "chat_app", "chat_mode": "chat_normal"}
        )
        not_text = await c.post(CHAT, json={"messages": "x", "chat_model": 1})
    # Honoured: a mode this server lacks is refused, not run as chat_normal.
    assert unknown.status_code == 400 and unknown.json()["err_code"] == "unsupported_chat_mode"
    for r in (both, not_text):
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_model"
    assert await stored(store) == (1, 2)
