"""OpenAIBackend: SSE parsing, retries, backoff, timeouts, cancellation, error mapping.

Parsing edge cases run through ``httpx.MockTransport``; retries, timeouts,
dropped connections and disconnects run against the fake upstream, a real
server on loopback (tests/backends/fake_upstream.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import httpx
import pytest

import convcore_openai.backend as backend_module
from convcore import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    PromptMessage,
)
from convcore_openai import OpenAIBackend
from tests.backends.fake_upstream import FakeUpstream, get_upstream

pytestmark = pytest.mark.anyio

BASE = "http://upstream.test/v1"


def req(model: str = "echo", text: str = "hello", **kw: Any) -> GenerationRequest:
    fields: dict[str, Any] = {"max_new_tokens": 64, "request_id": uuid.uuid4().hex, **kw}
    return GenerationRequest(model=model, messages=(PromptMessage(role="user", content=text),), **fields)


async def collect(backend: OpenAIBackend, request: GenerationRequest) -> list[GenerationChunk]:
    async with aclosing(backend.stream(request)) as chunks:
        return [c async for c in chunks]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.content for c in chunks)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the waits between attempts instead of sleeping."""
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(backend_module, "_sleep", fake_sleep)
    return recorded


# -- MockTransport helpers ---------------------------------------------------


def sse_body(*payloads: object, done: bool = True, sep: str = "\n") -> bytes:
    lines = []
    for p in payloads:
        data = p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)
        lines.append(f"data: {data}{sep}{sep}")
    if done:
        lines.append(f"data: [DONE]{sep}{sep}")
    return "".join(lines).encode()


def delta(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


USAGE = {
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}


def pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def sse_response(parts: list[bytes], status: int = 200, **headers: str) -> httpx.Response:
    async def stream() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    return httpx.Response(status, headers={"content-type": "text/event-stream", **headers}, content=stream())


def mock_backend(
    handler: Callable[[httpx.Request], httpx.Response], **kw: Any
) -> tuple[OpenAIBackend, httpx.AsyncClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(record))
    kw.setdefault("backoff", 0.001)
    return OpenAIBackend(BASE, client=client, **kw), client, seen


# -- SSE parsing ---------------------------------------------------------------

TRICKY = ["Hel", "lo, ", "wörld", " \u2028 line\u2029sep\x85", " 会话🙂", "\r\n not a line end"]


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100_000])
async def test_sse_split_anywhere_and_any_line_end(sep: str, size: int) -> None:
    body = sse_body(
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        *[delta(t) for t in TRICKY],
        {"object": "chat.completion.chunk", "choices": []},
        delta(finish="stop"),
        USAGE,
        sep=sep,
    )
    body = f": keep-alive{sep}{sep}retry: 100{sep}id: 1{sep}".encode() + body
    backend, _, _ = mock_backend(lambda r: sse_response(pieces(body, size)))
    chunks = await collect(backend, req())
    assert text_of(chunks) == "".join(TRICKY)
    assert [c.finish_reason for c in chunks] == [None] * len(TRICKY) + ["stop"]
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (7, 3)


async def test_sse_without_blank_lines_and_without_space_after_colon() -> None:
    body = b'data:{"choices":[{"index":0,"delta":{"content":"a"}}]}\ndata:{"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"length"}]}\ndata:[DONE]\n'
    backend, _, _ = mock_backend(lambda r: sse_response([body]))
    chunks = await collect(backend, req())
    assert text_of(chunks) == "ab"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].prompt_tokens is None, "no usage sent, none reported"


async def test_done_ends_the_stream_whatever_follows() -> None:
    body = sse_body(delta("x"), delta(finish="stop")) + b"data: not json at all\n\n"
    backend, _, _ = mock_backend(lambda r: sse_response([body]))
    assert text_of(await collect(backend, req())) == "x"


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("content_filter", "stop"),
        ("tool_calls", "stop"),
        (None, "stop"),
    ],
)
async def test_finish_reason_mapping(upstream: str | None, ours: str) -> None:
    body = sse_body(delta("x"), delta(finish=upstream))

    def complete(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return sse_response([body])
        choice = {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": upstream}
        return httpx.Response(200, json={"choices": [choice]})

    backend, _, _ = mock_backend(complete)
    chunks = await collect(backend, req())
    assert chunks[-1].finish_reason == ours
    assert [c.finish_reason is not None for c in chunks] == [False, True]
    assert (await backend.complete(req())).finish_reason == ours


async def test_error_event_mid_stream_is_a_backend_error_without_retry() -> None:
    body = sse_body(delta("partial"), {"error": {"message": "model overloaded", "type": "server_error"}})
    backend, _, seen = mock_backend(lambda r: sse_response([body]))
    got: list[str] = []
    with pytest.raises(BackendError, match="model overloaded") as info:
        async with aclosing(backend.stream(req())) as chunks:
            async for c in chunks:
                got.append(c.content)
    assert got == ["partial"]
    assert type(info.value) is BackendError
    assert len(seen) == 1


async def test_non_json_data_line_is_a_backend_error() -> None:
    body = sse_body(delta("a"), "[SERVER_ERROR] boom")
    backend, _, _ = mock_backend(lambda r: sse_response([body]))
    with pytest.raises(BackendError, match="non-JSON") as info:
        await collect(backend, req())
    assert isinstance(info.value.__cause__, ValueError)


async def test_stream_cut_short_is_retried_before_the_first_token() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return sse_response([sse_body(delta(""), done=False)])  # no token, no end
        return sse_response([sse_body(delta("ok"), delta(finish="stop"))])

    backend, _, _ = mock_backend(handler)
    assert text_of(await collect(backend, req())) == "ok"
    assert calls == 2


async def test_stream_cut_short_after_a_token_is_unavailable_without_retry() -> None:
    backend, _, seen = mock_backend(lambda r: sse_response([sse_body(delta("half"), done=False)]))
    with pytest.raises(BackendUnavailableError, match="mid-reply"):
        await collect(backend, req())
    assert len(seen) == 1


async def test_connection_lost_after_the_finish_reason_still_ends_the_reply() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield sse_body(delta("all"), delta(finish="length"), done=False)
        raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    backend, _, seen = mock_backend(handler)
    chunks = await collect(backend, req())
    assert [(c.content, c.finish_reason) for c in chunks] == [("all", None), ("", "length")]
    assert len(seen) == 1


async def test_upstream_answering_json_to_a_stream_request() -> None:
    choice = {"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 4, "completion_tokens": 1}
    backend, _, _ = mock_backend(lambda r: httpx.Response(200, json={"choices": [choice], "usage": usage}))
    chunks = await collect(backend, req())
    assert [(c.content, c.finish_reason) for c in chunks] == [("whole", None), ("", "stop")]
    assert chunks[-1].completion_tokens == 1


# -- requests and clients -----------------------------------------------------------


async def test_request_shape_and_headers() -> None:
    body = sse_body(delta("x"), delta(finish="stop"))
    backend, client, seen = mock_backend(
        lambda r: sse_response([body]), api_key="sk-secret", headers={"X-Extra": "1"}
    )
    r = req("up-model", "hi", max_new_tokens=9, temperature=0.5)
    await collect(backend, r)
    sent = json.loads(seen[0].content)
    assert str(seen[0].url) == f"{BASE}/chat/completions"
    assert sent == {
        "model": "up-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 9,
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert seen[0].headers["authorization"] == "Bearer sk-secret"
    assert seen[0].headers["x-request-id"] == r.request_id
    assert seen[0].headers["x-extra"] == "1"
    assert "sk-secret" not in repr(backend)
    await backend.aclose()
    assert not client.is_closed, "a passed-in client stays open"
    with pytest.raises(BackendError, match="closed"):
        await backend.complete(r)
    await client.aclose()


async def test_own_client_is_closed_by_aclose() -> None:
    backend = OpenAIBackend(BASE)
    own = backend._client
    await backend.aclose()
    await backend.aclose()
    assert own.is_closed


def test_bad_base_url_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="base_url"):
        OpenAIBackend("ftp://example.com/v1")


async def test_complete_with_an_unexpected_body_is_a_backend_error() -> None:
    backend, _, _ = mock_backend(lambda r: httpx.Response(200, json={"nothing": "here"}))
    with pytest.raises(BackendError, match="unexpected body"):
        await backend.complete(req())


# -- error mapping -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            400,
            {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}},
            "too large",
        ),
        (401, {"error": {"message": "Incorrect API key provided"}}, "Incorrect API key"),
        (404, {"error": "model not found"}, "model not found"),
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}, "field required"),
        (400, {"success": False, "err_code": "E0001", "err_msg": "bad chat_mode"}, "bad chat_mode"),
        (403, "plain text refusal", "plain text refusal"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_client_errors_carry_the_upstream_message_and_are_not_retried(
    status: int, body: object, message: str, streaming: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    backend, _, seen = mock_backend(handler)
    with pytest.raises(BackendError, match=message) as info:
        await (collect(backend, req()) if streaming else backend.complete(req()))
    assert type(info.value) is BackendError
    assert str(status) in str(info.value)
    assert len(seen) == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503])
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_retryable_statuses_back_off_exponentially_with_jitter_then_give_up(
    status: int, streaming: bool, sleeps: list[float]
) -> None:
    backend, _, seen = mock_backend(
        lambda r: httpx.Response(status, json={"error": {"message": "busy"}}), max_retries=3, backoff=0.1
    )
    with pytest.raises(BackendUnavailableError, match="busy") as info:
        await (collect(backend, req()) if streaming else backend.complete(req()))
    assert "4 attempt" in str(info.value)
    assert len(seen) == 4
    assert len(sleeps) == 3
    for n, wait in enumerate(sleeps):
        assert 0.05 * 2**n <= wait <= 0.1 * 2**n


async def test_retry_after_seconds_and_dates_are_honoured_and_capped(sleeps: list[float]) -> None:
    date = email.utils.formatdate(time.time() + 3, usegmt=True)
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "1.5"}),
            httpx.Response(503, headers={"Retry-After": date}),
            httpx.Response(429, headers={"Retry-After": "3600"}),
            httpx.Response(429, headers={"Retry-After": "soon"}),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or sse_response([sse_body(delta("ok"), delta(finish="stop"))])

    backend, _, seen = mock_backend(handler, max_retries=5, backoff=0.01, max_backoff=10)
    assert text_of(await collect(backend, req())) == "ok"
    assert len(seen) == 5
    assert sleeps[0] == 1.5
    assert 1 <= sleeps[1] <= 3.01
    assert sleeps[2] == 10, "capped at max_backoff"
    assert sleeps[3] <= 0.08, "unparseable: ordinary backoff"


async def test_connect_errors_are_retried_then_unavailable_chained(sleeps: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    backend, _, seen = mock_backend(handler, max_retries=2)
    with pytest.raises(BackendUnavailableError, match="3 attempt") as info:
        await backend.complete(req())
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(seen) == 3 and len(sleeps) == 2


async def test_a_connection_error_then_success(sleeps: list[float]) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.RemoteProtocolError("peer closed", request=request)
        return sse_response([sse_body(delta("fine"), delta(finish="stop"))])

    backend, _, _ = mock_backend(handler)
    assert text_of(await collect(backend, req())) == "fine"


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_read_timeout_is_not_retried(streaming: bool, sleeps: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    backend, _, seen = mock_backend(handler)
    with pytest.raises(BackendTimeoutError) as info:
        await (collect(backend, req()) if streaming else backend.complete(req()))
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert len(seen) == 1


async def test_connect_timeout_is_retried_then_a_timeout(sleeps: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("slow connect", request=request)

    backend, _, seen = mock_backend(handler, max_retries=1)
    with pytest.raises(BackendTimeoutError, match="connecting"):
        await collect(backend, req())
    assert len(seen) == 2


# -- against the real upstream on loopback ---------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> FakeUpstream:
    return get_upstream()


@pytest.fixture
async def real(upstream: FakeUpstream) -> AsyncIterator[OpenAIBackend]:
    backend = OpenAIBackend(upstream.base_url, timeout=5, backoff=0.01, max_retries=2)
    yield backend
    await backend.aclose()


def unique(directives: str) -> str:
    return f"echo;{directives};id={uuid.uuid4().hex}"


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_real_429_with_retry_after_then_success(upstream: FakeUpstream, streaming: bool) -> None:
    backend = OpenAIBackend(upstream.base_url, backoff=5, max_retries=3)  # backoff would be far longer
    model = unique("fail=429;times=2;retry_after=0.1")
    start = time.monotonic()
    try:
        r = req(model, "retry me")
        content = text_of(await collect(backend, r)) if streaming else (await backend.complete(r)).content
    finally:
        await backend.aclose()
    assert content == "You said: retry me"
    assert upstream.attempts_for(model) == 3
    assert 0.2 <= time.monotonic() - start < 3


@pytest.mark.parametrize("status", [500, 503])
async def test_real_5xx_until_retries_run_out(
    upstream: FakeUpstream, real: OpenAIBackend, status: int
) -> None:
    model = unique(f"fail={status}")
    with pytest.raises(BackendUnavailableError, match=f"{status}"):
        await collect(real, req(model))
    assert upstream.attempts_for(model) == 3


async def test_real_failures_chosen_by_header(upstream: FakeUpstream) -> None:
    header = f"fail=502;times=1;id={uuid.uuid4().hex}"
    backend = OpenAIBackend(upstream.base_url, headers={"X-Fake": header}, backoff=0.01)
    try:
        assert (await backend.complete(req())).content == "You said: hello"
    finally:
        await backend.aclose()
    assert upstream.attempts_for("echo", header) == 2


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_real_dropped_connection_before_any_token_is_retried(
    upstream: FakeUpstream, real: OpenAIBackend, streaming: bool
) -> None:
    model = unique("drop=0;times=1")
    r = req(model, "again")
    content = text_of(await collect(real, r)) if streaming else (await real.complete(r)).content
    assert content == "You said: again"
    assert upstream.attempts_for(model) == 2


async def test_real_dropped_connection_after_tokens_is_not_retried(
    upstream: FakeUpstream, real: OpenAIBackend
) -> None:
    model = unique("drop=3")
    got: list[GenerationChunk] = []
    with pytest.raises(BackendUnavailableError, match="mid-reply") as info:
        async with aclosing(real.stream(req(model, "a b c d e f g"))) as chunks:
            async for c in chunks:
                got.append(c)
    assert isinstance(info.value.__cause__, httpx.HTTPError)
    assert len(got) == 3 and all(c.finish_reason is None for c in got)
    assert upstream.attempts_for(model) == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_real_hang_times_out_and_the_upstream_sees_the_disconnect(
    upstream: FakeUpstream, streaming: bool
) -> None:
    backend = OpenAIBackend(upstream.base_url, timeout=0.3, backoff=0.01)
    model = unique("hang=1")
    r = req(model)
    start = time.monotonic()
    try:
        with pytest.raises(BackendTimeoutError) as info:
            await (collect(backend, r) if streaming else backend.complete(r))
    finally:
        await backend.aclose()
    assert 0.25 <= time.monotonic() - start < 3
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert upstream.attempts_for(model) == 1, "a read timeout is not retried"
    await upstream.wait_for(r.request_id or "", disconnected=True)


async def test_real_stall_mid_stream_times_out(upstream: FakeUpstream) -> None:
    backend = OpenAIBackend(upstream.base_url, timeout=0.3)
    r = req(unique("stall=2"), "one two three four five")
    got: list[str] = []
    try:
        with pytest.raises(BackendTimeoutError):
            async with aclosing(backend.stream(r)) as chunks:
                async for c in chunks:
                    got.append(c.content)
    finally:
        await backend.aclose()
    assert len(got) == 2
    await upstream.wait_for(r.request_id or "", disconnected=True)


async def test_real_connection_refused_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", max_retries=1, backoff=0.01)
    try:
        with pytest.raises(BackendUnavailableError, match="2 attempt") as info:
            await backend.complete(req())
    finally:
        await backend.aclose()
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_real_cancellation_mid_stream_reaches_the_upstream(
    upstream: FakeUpstream, real: OpenAIBackend
) -> None:
    r = req("echo;delay=0.05", " ".join(["word"] * 40))
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in real.stream(r):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ex = await upstream.wait_for(r.request_id or "", disconnected=True)
    assert 1 <= ex.sent < ex.total
    # The pool is still usable after the aborted exchange.
    assert (await real.complete(req())).content == "You said: hello"


async def test_real_stream_reports_upstream_usage(upstream: FakeUpstream, real: OpenAIBackend) -> None:
    r = req("echo", "count me", max_new_tokens=3)
    chunks = await collect(real, r)
    # The upstream marks the exchange finished after its last write, which
    # the client may read first: wait for it rather than race it.
    ex = await upstream.wait_for(r.request_id or "", disconnected=False)
    assert ex.body["stream_options"] == {"include_usage": True} and ex.finished
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3
    assert chunks[-1].prompt_tokens and chunks[-1].prompt_tokens > 3
    gen = await real.complete(r)
    assert (gen.prompt_tokens, gen.completion_tokens) == (chunks[-1].prompt_tokens, 3)
