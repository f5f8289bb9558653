"""A deterministic OpenAI-compatible upstream, served for real on loopback.

``POST /v1/chat/completions`` answers like convcore's LocalBackend: the
reply is ``echo_reply(messages)`` (shaped by ``response_format`` and
``stop`` as the local model does), cut at ``max_tokens`` cl100k tokens
(finish_reason ``length``), streamed one token's text per SSE chunk, with a
usage-only chunk when ``stream_options.include_usage`` is set, then
``data: [DONE]``. Usage counts follow convcore's chat-format rule.

Models named ``echo`` answer; any other name gets OpenAI's 404
``model_not_found``. Behaviour is chosen per request by ``;key=value``
directives after ``echo`` in the model name, or in an ``X-Fake`` header:

``delay=S``        wait S seconds before each streamed piece
``fail=CODE``      answer CODE (429, 500, 503, 400...) with an OpenAI error body
``retry_after=V``  send ``Retry-After: V`` with a failure
``hang=1``         send nothing until the client goes away (at most 30 s)
``drop=N``         send the headers and N pieces, then drop the connection
``stall=N``        stream N pieces, then send nothing until the client goes away
``ignore_budget=1`` ignore ``max_tokens``: the whole reply, ten times over, ends with ``stop``
``times=N``        misbehave (fail, hang, drop, stall, ignore_budget) on the first N requests
                   for this model string and header only, then answer normally
``id=X``           nothing; makes the model string (and its counter) unique
``tools=N``        call tools N times after each user message before answering:
                   each step is an assistant reply with ``parallel=K`` (default
                   1) calls of ``lookup`` (ids ``call_<step>_<k>``, arguments
                   ``{"query": <user text>, "step": s, "part": k}``), streamed as
                   OpenAI does (id and name first, arguments in fragments); the
                   final answer is ``Answer from N tool results: r1 | r2 ...``

Like OpenAI, any upstream answers 400 to a prompt whose tool results do not
answer the assistant tool calls right before them, or whose calls are left
without results.

Each exchange is recorded by its ``X-Request-ID`` with the body as
received, so a test sees every parameter that arrived: pieces sent and total,
whether it finished, whether the client disconnected before the end.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from convcore.generation import PromptMessage
from convcore.local import echo_reply, shape_reply
from convcore.tokens import REPLY_PRIMING_TOKENS, count_prompt_message, get_tokenizer

__all__ = ["Exchange", "FakeUpstream", "get_upstream"]

_HANG_LIMIT = 30.0


@dataclass
class Exchange:
    """One request as the upstream saw it."""

    request_id: str
    model: str
    stream: bool
    body: dict[str, Any]
    headers: dict[str, str]
    total: int = 0  # content pieces the full reply has
    sent: int = 0  # content pieces sent
    finished: bool = False
    disconnected: bool = False  # the client went away before the end


@dataclass
class _Reply:
    pieces: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def content(self) -> str:
        return "".join(self.pieces)


class _Dropped(Exception):
    """Raised inside the app to make uvicorn drop the connection."""


def _directives(*sources: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for source in sources:
        for part in source.split(";")[1:] if source.startswith("echo") else source.split(";"):
            key, _, value = part.partition("=")
            if key.strip():
                found[key.strip()] = value.strip()
    return found


def _pairing_problem(messages: list[dict[str, Any]]) -> str | None:
    """OpenAI's check: results answer the calls right before them, and every call gets one."""
    waiting: list[str] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            if m.get("tool_call_id") not in waiting:
                return (
                    f"messages[{i}]: role 'tool' must be a response to a preceding message with 'tool_calls'"
                )
            waiting.remove(m["tool_call_id"])
            continue
        if waiting:
            return f"tool_call_ids did not have response messages: {waiting}"
        waiting = [c["id"] for c in m.get("tool_calls") or ()]
    return f"tool_call_ids did not have response messages: {waiting}" if waiting else None


def _tool_step(messages: tuple[PromptMessage, ...], opts: dict[str, str]) -> list[dict[str, Any]] | None:
    """The calls of the next tool step, or None when it is time to answer."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    done = sum(1 for m in messages[last_user + 1 :] if m.tool_calls)
    if done >= int(opts.get("tools", "0")):
        return None
    query = messages[last_user].content if last_user >= 0 else ""
    step = done + 1
    return [
        {
            "id": f"call_{step}_{k}",
            "type": "function",
            "function": {
                "name": "lookup",
                "arguments": json.dumps({"query": query, "step": step, "part": k}),
            },
        }
        for k in range(int(opts.get("parallel", "1")))
    ]


def _tool_answer(messages: tuple[PromptMessage, ...]) -> str:
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    results = [m.content for m in messages[last_user + 1 :] if m.role == "tool"]
    return f"Answer from {len(results)} tool results: " + " | ".join(results)


def _message(m: dict[str, Any]) -> PromptMessage:
    content = m.get("content") or ""
    fields = {"role": m["role"], "name": m.get("name")}
    fields |= {"tool_call_id": m.get("tool_call_id"), "tool_calls": m.get("tool_calls")}
    if isinstance(content, list):  # content parts: the text is what they say
        text = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        return PromptMessage.model_validate({**fields, "content": text, "parts": content})
    return PromptMessage.model_validate({**fields, "content": content})


def _reply(body: dict[str, Any], opts: dict[str, str], ignore_budget: bool = False) -> _Reply:
    tok = get_tokenizer("cl100k_base")
    messages = tuple(_message(m) for m in body["messages"])
    prompt = sum(count_prompt_message(tok, m) for m in messages) + REPLY_PRIMING_TOKENS
    if "tools" in opts:
        calls = _tool_step(messages, opts)
        if calls is not None:
            spent = sum(len(tok.encode(c["function"]["arguments"])) for c in calls)
            return _Reply([], "tool_calls", prompt, spent, tool_calls=calls)
    text = shape_reply(_tool_answer(messages) if "tools" in opts else echo_reply(messages), body)
    tokens = list(tok.encode(" ".join([text] * 10) if ignore_budget else text))
    limit = None if ignore_budget else body.get("max_tokens") or body.get("max_completion_tokens")
    limit = limit or len(tokens)
    cut = len(tokens) > limit
    tokens = tokens[:limit]
    pieces: list[str] = []
    pending: list[int] = []
    for t in tokens:
        pending.append(t)
        text = tok.decode(pending)
        if not text.endswith("\ufffd"):
            pieces.append(text)
            pending.clear()
    if pending:
        pieces.append(tok.decode(pending))
    return _Reply(pieces, "length" if cut else "stop", prompt, len(tokens))


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


def _sse(payload: object) -> dict[str, Any]:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}


class _Exchanging(Response):
    """A raw ASGI answer that watches for the client going away while it runs."""

    def __init__(self, ex: Exchange, reply: _Reply, opts: dict[str, str], misbehave: bool) -> None:
        super().__init__()
        self.ex, self.reply, self.opts, self.misbehave = ex, reply, opts, misbehave

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._answer(send, gone)
        finally:
            watcher.cancel()

    async def _wait_gone(self, gone: asyncio.Event, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), seconds)
        if gone.is_set() and not self.ex.finished:
            self.ex.disconnected = True
        return gone.is_set()

    async def _answer(self, send: Send, gone: asyncio.Event) -> None:
        ex, reply, opts = self.ex, self.reply, self.opts
        if self.misbehave and "hang" in opts:
            await self._wait_gone(gone, _HANG_LIMIT)
            return
        drop = int(opts["drop"]) if self.misbehave and "drop" in opts else None
        stall = int(opts["stall"]) if self.misbehave and "stall" in opts else None
        delay = float(opts.get("delay", "0"))
        stamp = {"id": f"chatcmpl-{ex.request_id}", "created": int(time.time()), "model": ex.model}
        kind = "text/event-stream" if ex.stream else "application/json"
        headers = [(b"content-type", kind.encode()), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if not ex.stream:
            if drop is not None:
                raise _Dropped("dropping the connection on purpose")
            body = {
                **stamp,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": reply.content if reply.tool_calls is None else None,
                            **({"tool_calls": reply.tool_calls} if reply.tool_calls else {}),
                        },
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": self._usage(),
            }
            ex.sent, ex.finished = ex.total, True
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return
        chunk = {**stamp, "object": "chat.completion.chunk"}
        await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        await send(_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        for n, piece in enumerate(reply.pieces):
            if drop is not None and n == drop:
                raise _Dropped("dropping the connection on purpose")
            if stall is not None and n == stall:
                await self._wait_gone(gone, _HANG_LIMIT)
                return
            if (delay and await self._wait_gone(gone, delay)) or gone.is_set():
                ex.disconnected = True
                return
            delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            await send(_sse({**chunk, "choices": [delta]}))
            ex.sent += 1
        if drop is not None and drop >= len(reply.pieces):
            raise _Dropped("dropping the connection on purpose")
        for index, call in enumerate(reply.tool_calls or ()):
            # As OpenAI streams a call: id, type and name first, then the arguments in fragments.
            head = {**call, "index": index, "function": {"name": call["function"]["name"], "arguments": ""}}
            await send(_sse({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [head]}}]}))
            args = call["function"]["arguments"]
            for part in (args[: len(args) // 2], args[len(args) // 2 :]):
                piece = {"index": index, "function": {"arguments": part}}
                await send(_sse({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [piece]}}]}))
        last = {"index": 0, "delta": {}, "finish_reason": reply.finish_reason}
        await send(_sse({**chunk, "choices": [last]}))
        if (ex.body.get("stream_options") or {}).get("include_usage"):
            await send(_sse({**chunk, "choices": [], "usage": self._usage()}))
        await send(_sse("[DONE]"))
        ex.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _usage(self) -> dict[str, int]:
        p, c = self.reply.prompt_tokens, self.reply.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@dataclass
class FakeUpstream:
    """The app, its recordings, and the uvicorn server running it in a thread."""

    exchanges: dict[str, Exchange] = field(default_factory=dict)
    history: list[Exchange] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])

    async def _chat(self, request: Request) -> Response:
        try:
            body = await request.json()
            model = str(body["model"])
            if not isinstance(body["messages"], list) or not body["messages"]:
                raise ValueError("messages must be a non-empty list")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"invalid request: {exc!r}", "invalid_request")
        if not model.startswith("echo"):
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        header = request.headers.get("x-fake", "")
        opts = _directives(model, header)
        key = f"{model}|{header}"
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        ex = Exchange(request_id, model, bool(body.get("stream")), body, dict(request.headers))
        with self._lock:
            self.exchanges[request_id] = ex
            self.history.append(ex)
        misbehave = attempt <= int(opts.get("times", "1000000"))
        if misbehave and "fail" in opts:
            status = int(opts["fail"])
            retry = {"Retry-After": opts["retry_after"]} if "retry_after" in opts else None
            return _error(status, f"fake failure {status} on attempt {attempt}", "fake_failure", retry)
        problem = _pairing_problem(body["messages"])
        if problem is not None:
            return _error(400, f"Invalid parameter: {problem}", "invalid_tool_pairing")
        reply = _reply(body, opts, ignore_budget=misbehave and opts.get("ignore_budget") == "1")
        ex.total = len(reply.pieces)
        return _Exchanging(ex, reply, opts, misbehave)

    def attempts_for(self, model: str, header: str = "") -> int:
        return self.attempts[f"{model}|{header}"]

    async def wait_for(self, request_id: str, *, disconnected: bool = True, timeout: float = 5.0) -> Exchange:
        """The exchange once it has disconnected (or finished), polling up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            ex = self.exchanges.get(request_id)
            if ex is not None and (ex.disconnected if disconnected else ex.finished):
                return ex
            if time.monotonic() > deadline:
                state = "disconnect" if disconnected else "finish"
                raise AssertionError(f"the upstream did not see {request_id!r} {state}: {ex}")
            await asyncio.sleep(0.01)

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-upstream", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
            self._server = self._thread = None


_upstream: FakeUpstream | None = None
_upstream_lock = threading.Lock()


def get_upstream() -> FakeUpstream:
    """The session's one fake upstream, started on first use, stopped at exit."""
    global _upstream
    with _upstream_lock:
        if _upstream is None:
            upstream = FakeUpstream()
            upstream.start()
            atexit.register(upstream.stop)
            _upstream = upstream
        return _upstream
