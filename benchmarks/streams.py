"""One streamed turn, timed from the client's side: the two ways to send it.

- :class:`EngineStreamer`: ``Engine.chat_stream`` in this process (the
  library on any store); a chunk's time is when the engine yields it.
- :class:`SseStreamer`: ``POST …/chat/completions`` with ``stream: true``
  over :mod:`benchmarks.wire`, reading the SSE events as they arrive.
  History is kept by the server (``conv_uid`` in the body, DB-GPT and
  convcore) or resent by the client (the whole conversation each turn, any
  OpenAI-compatible server: vLLM, llama.cpp, Ollama).

Both fill a :class:`~benchmarks.hdr.TurnOutcome`: the send time, the arrival
of every chunk with content, the end, token counts (the server's ``usage``
when it sends one, else one per content chunk) and, on failure, the error's
kind. They never raise for a failed turn: a failure is a measurement.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .hdr import TurnOutcome
from .wire import HttpPool, ProtocolError, SseSplitter

__all__ = ["EngineStreamer", "SseStreamer", "apply_event", "chat_body", "error_kind"]


def error_kind(exc: BaseException) -> str:
    """A short, stable name for what went wrong, for ``errors by kind``."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError | BrokenPipeError):
        return "connect"
    if isinstance(exc, asyncio.IncompleteReadError | ProtocolError):
        return "protocol"
    if isinstance(exc, OSError):
        return "connect"
    return type(exc).__name__


def chat_body(
    conv_uid: str,
    text: str,
    *,
    model: str | None,
    max_new_tokens: int,
    history: list[dict[str, str]] | None = None,
) -> bytes:
    """A streamed turn's JSON body: the new message and the conv_uid (the server
    keeps the history), or, with ``history`` given, the whole conversation resent."""
    body: dict[str, Any] = {
        "stream": True,
        "max_new_tokens": max_new_tokens,
        "max_tokens": max_new_tokens,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    if history is not None:
        body["messages"] = [*history, {"role": "user", "content": text}]
    else:
        body.update(messages=text, conv_uid=conv_uid, user_name="ccbench")
    return json.dumps(body).encode()


def apply_event(event: dict[str, Any], outcome: TurnOutcome, now: float) -> None:
    """Fold one SSE chunk (OpenAI/DB-GPT ``chat.completion.chunk``) into ``outcome``."""
    if "error" in event or ("code" in event and "choices" not in event):
        err = event.get("error", event)
        outcome.error = "stream_error"
        outcome.detail = str(err.get("message", err) if isinstance(err, dict) else err)[:200]
        return
    # convcore's chunks carry the conv_uid as id (as DB-GPT's API documentation says) and the turn as turn_id.
    outcome.turn_id = event.get("turn_id") or event.get("id", outcome.turn_id)
    outcome.conv_uid = event.get("conv_uid") or outcome.conv_uid
    for choice in event.get("choices") or ():
        content = (choice.get("delta") or {}).get("content")
        if content:
            outcome.token_times.append(now)
            outcome.content += content
        if choice.get("finish_reason"):
            outcome.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if usage:
        outcome.tokens_in = int(usage.get("prompt_tokens") or 0)
        outcome.tokens_out = int(usage.get("completion_tokens") or 0)


class EngineStreamer:
    """Turns through ``engine.chat_stream`` (history kept by the engine's store)."""

    def __init__(self, engine: Any, *, max_new_tokens: int, timeout: float) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.timeout = timeout

    async def turn(self, conv_uid: str, text: str, outcome: TurnOutcome) -> None:
        request = {
            "messages": text,
            "conv_uid": conv_uid,
            "max_new_tokens": self.max_new_tokens,
            "user_name": "ccbench",
            "stream": True,
        }
        clock = time.perf_counter
        outcome.conv_uid = conv_uid
        outcome.sent = clock()
        try:
            async with asyncio.timeout(self.timeout):
                async for chunk in self.engine.chat_stream(request):
                    now = clock()
                    outcome.turn_id = chunk.id
                    choice = chunk.choices[0] if chunk.choices else None
                    if choice is not None and choice.delta.content:
                        outcome.token_times.append(now)
                        outcome.content += choice.delta.content
                    if choice is not None and choice.finish_reason:
                        outcome.finish_reason = choice.finish_reason
                    if chunk.usage is not None:
                        outcome.tokens_in = chunk.usage.prompt_tokens
                        outcome.tokens_out = chunk.usage.completion_tokens
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome.error, outcome.detail = error_kind(exc), f"{type(exc).__name__}: {exc}"
        outcome.end = clock()
        if not outcome.tokens_out:
            outcome.tokens_out = len(outcome.token_times)

    async def aclose(self) -> None:
        return None


class SseStreamer:
    """Streamed chat turns over HTTP to ``chat_url``.

    ``history="server"`` sends the new message and the conv_uid (the server
    keeps the conversation); ``"client"`` resends the whole conversation as
    an OpenAI ``messages`` list and keeps it here."""

    def __init__(
        self,
        chat_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        max_new_tokens: int = 256,
        history: str = "server",
        connections: int = 256,
        timeout: float = 30.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.pool = HttpPool(chat_url, limit=connections, headers=headers)
        rest = chat_url.split("://", 1)[1]
        self.path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.history = history
        self.timeout = timeout
        self.kept: dict[str, list[dict[str, str]]] = {}

    def _body(self, conv_uid: str, text: str) -> bytes:
        history = self.kept.get(conv_uid, []) if self.history == "client" else None
        return chat_body(
            conv_uid, text, model=self.model, max_new_tokens=self.max_new_tokens, history=history
        )

    async def turn(self, conv_uid: str, text: str, outcome: TurnOutcome) -> None:
        clock = time.perf_counter
        outcome.conv_uid = conv_uid
        body = self._body(conv_uid, text)
        outcome.sent = clock()
        try:
            async with asyncio.timeout(self.timeout):
                await self._exchange(body, outcome, clock)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome.error, outcome.detail = error_kind(exc), f"{type(exc).__name__}: {exc}"
        outcome.end = clock()
        if not outcome.tokens_out:
            outcome.tokens_out = len(outcome.token_times)
        if outcome.error is None and self.history == "client":
            self.kept.setdefault(conv_uid, []).extend(
                [{"role": "user", "content": text}, {"role": "assistant", "content": outcome.content}]
            )

    async def _exchange(self, body: bytes, outcome: TurnOutcome, clock: Any) -> None:
        def sent() -> None:
            outcome.sent = clock()

        async with self.pool.request("POST", self.path, body, on_send=sent) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode("utf-8", "replace")
                outcome.error, outcome.detail = f"http_{response.status}", text
                return
            splitter = SseSplitter()
            done = False
            async for data in response.chunks():
                now = clock()
                for payload in splitter.feed(data):
                    if payload == b"[DONE]":
                        done = True
                        continue
                    apply_event(json.loads(payload), outcome, now)
                    if outcome.error is not None:
                        return
            if not done and outcome.finish_reason is None:
                outcome.error, outcome.detail = "incomplete", "the stream ended before [DONE]"

    async def aclose(self) -> None:
        await self.pool.aclose()
