"""Misbehaving backends as a client of the HTTP service sees them, through the OpenAI SDK.

The same ``backend_factory`` as the backend contract: the local backend, and
the OpenAI-compatible one against a loopback upstream misbehaving for real.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import openai
import pytest

from convcore import Engine, MemoryStore, ModelBackend, ModelRegistry, ModelSpec, get_tokenizer
from convcore_server import create_app
from tests.adapters.server_support import CHAT, KEYS, assert_error_body
from tests.backends import BackendFactory, Misbehaviour

pytestmark = pytest.mark.anyio

LONG = "Tell me about " + " ".join(f"item{n}" for n in range(60)) + "."
MAX_TOKENS = 9


@asynccontextmanager
async def served(
    factory: BackendFactory, faults: Misbehaviour
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, MemoryStore]]:
    backend: ModelBackend = factory.misbehaving(faults)
    store = MemoryStore()
    spec = ModelSpec(name="m", backend=backend, upstream=factory.model, context_window=8192)
    app = create_app(Engine(store, ModelRegistry([spec])), api_keys=KEYS)
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://convcore.test",
        headers={"Authorization": f"Bearer {KEYS[0]}"},
    )
    # openai 3.x is typed for httpx2 clients but takes httpx ones too.
    sdk = openai.AsyncOpenAI(
        base_url="http://convcore.test/api/v2",
        api_key=KEYS[0],
        http_client=http,  # type: ignore[arg-type]
        max_retries=0,  # the SDK's own retries would hide the status
    )
    try:
        yield sdk, http, store
    finally:
        await sdk.close()
        await backend.aclose()


async def stored_replies(store: MemoryStore) -> list[str]:
    convs = await store.list_conversations(limit=100)
    return [m.content for c in convs for m in await store.read_messages(c.conv_uid) if m.role == "assistant"]


def ask(stream: bool) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": LONG}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_backend_ignoring_max_tokens_gives_the_sdk_at_most_max_tokens(
    backend_factory: BackendFactory, stream: bool
) -> None:
    async with served(backend_factory, Misbehaviour(ignore_budget=True)) as (sdk, _, store):
        if stream:
            chunks = [c async for c in await sdk.chat.completions.create(**ask(True))]  # type: ignore[call-overload]
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
            usage = chunks[-1].usage
        else:
            reply = await sdk.chat.completions.create(**ask(False))  # type: ignore[call-overload]
            content, finish, usage = (
                reply.choices[0].message.content,
                reply.choices[0].finish_reason,
                reply.usage,
            )
        assert get_tokenizer().count(content) == MAX_TOKENS
        assert finish == "length"
        assert usage is not None and usage.completion_tokens == MAX_TOKENS
        assert await stored_replies(store) == [content]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_upstream_429_before_the_first_token_reaches_the_sdk_as_429(
    backend_factory: BackendFactory, stream: bool
) -> None:
    async with served(backend_factory, Misbehaviour(fail_before_first_token=True)) as (sdk, _, store):
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(**ask(stream))  # type: ignore[call-overload]
        assert caught.value.status_code == 429
        assert caught.value.code == "rate_limit_exceeded"
        assert "answered 429" in caught.value.message
        assert await stored_replies(store) == []


async def test_a_stream_failing_before_its_first_token_answers_like_the_whole_call(
    backend_factory: BackendFactory,
) -> None:
    async with served(backend_factory, Misbehaviour(fail_before_first_token=True)) as (_, http, _):
        whole = await http.post(CHAT, json=ask(False))
        streamed = await http.post(CHAT, json=ask(True))
    assert streamed.status_code == whole.status_code == 429
    assert streamed.headers["content-type"] == whole.headers["content-type"] == "application/json"
    assert_error_body(streamed.json(), "rate_limit_exceeded")
    body, expected = streamed.json(), whole.json()
    # The upstream numbers its attempts in its message; all else is the same.
    assert {**body, "err_msg": "", "error": {**body["error"], "message": ""}} == {
        **expected,
        "err_msg": "",
        "error": {**expected["error"], "message": ""},
    }


async def test_a_stream_failing_after_some_tokens_is_200_then_an_error_unless_max_tokens_came_first(
    backend_factory: BackendFactory,
) -> None:
    faults = Misbehaviour(ignore_budget=True, fail_after_tokens=20)
    async with served(backend_factory, faults) as (sdk, http, store):
        async with http.stream("POST", CHAT, json={**ask(True), "max_tokens": 500}) as response:
            assert response.status_code == 200
            await response.aread()
        got: list[str] = []
        stream = await sdk.chat.completions.create(**{**ask(True), "max_tokens": 500})  # type: ignore[call-overload]
        with pytest.raises(openai.APIError, match="mid"):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        assert "".join(got).startswith("You said: Tell me about")
        assert await stored_replies(store) == []
        # max_tokens is reached before the failure: a whole, stored reply.
        chunks = [c async for c in await sdk.chat.completions.create(**ask(True))]  # type: ignore[call-overload]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert await stored_replies(store) == [content]


async def test_an_upstream_retry_after_is_passed_on() -> None:
    from convcore_openai import OpenAIBackend
    from tests.backends.fake_upstream import get_upstream

    upstream = get_upstream()
    backend = OpenAIBackend(
        upstream.base_url, max_retries=0, headers={"X-Fake": f"fail=429;retry_after=7;id={uuid.uuid4().hex}"}
    )
    spec = ModelSpec(name="m", backend=backend, upstream="echo", context_window=8192)
    app = create_app(Engine(MemoryStore(), ModelRegistry([spec])), api_keys=KEYS)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://convcore.test",
        headers={"Authorization": f"Bearer {KEYS[0]}"},
    ) as http:
        for stream in (False, True):
            response = await http.post(CHAT, json=ask(stream))
            assert response.status_code == 429 and response.headers["retry-after"] == "7"
    await backend.aclose()
