"""A model backend for any server that speaks OpenAI's ``POST /chat/completions``.

OpenAI, vLLM, Ollama, DB-GPT and convcore itself all do. Failures map onto
convcore's errors at this edge, the httpx error chained with ``from``:

- a timeout (waiting to connect, or for the next bytes) -> ``BackendTimeoutError``;
  a connect timeout is retried like a refused connection, a read timeout is
  not (the upstream may still be generating, and a retry would pay twice);
- a refused or dropped connection, or HTTP 429 / 5xx -> retried with
  exponential backoff and jitter (``Retry-After`` honoured, capped at
  ``max_backoff``), but only until the first token has been yielded; then
  ``BackendUnavailableError``;
- any other HTTP error -> ``BackendError`` carrying the upstream's message.

Closing a stream early (``aclose()`` or cancelling its task) closes the
upstream response, which closes its connection: the server sees the
disconnect and can stop generating.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
import uuid
from collections.abc import AsyncGenerator, Collection, Mapping
from typing import Any

import httpx
from pydantic import ValidationError

from convcore.errors import (
    BackendError,
    BackendRateLimitedError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
)
from convcore.generation import Generation, GenerationChunk, GenerationRequest, PromptMessage
from convcore.models import FinishReason, FunctionCall, ToolCall
from convcore.params import PASS_THROUGH

from .sse import ServerSentEvent, iter_events, iter_lines

__all__ = ["OpenAIBackend"]

_MAX_ERROR_BODY = 64 * 1024
_MAX_ERROR_TEXT = 500


async def _sleep(seconds: float) -> None:
    """Waits between attempts (a seam for tests that check the delays)."""
    await asyncio.sleep(seconds)


class _Truncated(Exception):
    """The body ended before the reply did: treated like a dropped connection."""


class OpenAIBackend:
    """Chat completions from ``{base_url}/chat/completions``.

    Pass ``client`` to share an ``httpx.AsyncClient`` (it stays open when the
    backend closes), or let the backend build its own (closed by
    :meth:`aclose`). ``timeout`` bounds each wait for data, the first token
    included; ``connect_timeout`` the wait to connect; both apply to a
    passed-in client too (None: no limit). ``max_retries`` extra attempts
    follow a retryable failure before the first token, waiting
    ``backoff * 2**n`` seconds (jittered, at most ``max_backoff``).
    ``include_usage`` asks a streaming upstream for token counts
    (``stream_options``); turn it off for a server that rejects the field.
    ``supported_params`` are the OpenAI parameters passed on (all of
    ``convcore.params.PASS_THROUGH`` by default); narrow it for a server
    that rejects some, so convcore refuses them with a clear error instead.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: float | None = 60.0,
        connect_timeout: float | None = 5.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        headers: Mapping[str, str] | None = None,
        include_usage: bool = True,
        supported_params: Collection[str] = PASS_THROUGH,
    ) -> None:
        url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidRequestError(f"must be an http(s) URL, got {base_url!r}", field="base_url")
        if max_retries < 0:
            raise InvalidRequestError("must be 0 or more", field="max_retries")
        self.base_url = base_url.rstrip("/")
        self._url = url
        self._headers = {"Accept": "application/json, text/event-stream", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._max_retries = max_retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._include_usage = include_usage
        self.supported_params = frozenset(supported_params)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._closed = False

    def __repr__(self) -> str:
        # Never the key: reprs end up in logs.
        return f"OpenAIBackend({self.base_url!r})"

    # -- the protocol ------------------------------------------------------

    async def complete(self, request: GenerationRequest) -> Generation:
        """The whole reply, from one non-streaming request (retried as described above)."""
        body = self._body(request, stream=False)
        headers = self._request_headers(request)
        for attempt in range(self._max_retries + 1):
            self._check_open()
            try:
                response = await self._client.post(
                    self._url, json=body, headers=headers, timeout=self._timeout
                )
            except httpx.TimeoutException as exc:
                if not self._retry_timeout(exc, attempt):
                    raise self._timeout_error(exc) from exc
                await _sleep(self._delay(attempt))
                continue
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                if attempt >= self._max_retries:
                    raise self._unavailable(exc, attempt) from exc
                await _sleep(self._delay(attempt))
                continue
            except (httpx.HTTPError, httpx.InvalidURL, RuntimeError) as exc:
                raise BackendError(f"request to {self.base_url} failed: {exc!r}") from exc
            if response.is_success:
                return _parse_completion(response)
            await _sleep(self._status_failure(response, response.content, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """The reply as the upstream streams it, then one chunk with ``finish_reason``
        and the upstream's token counts (when it sent them)."""
        body = self._body(request, stream=True)
        headers = self._request_headers(request)
        started = False  # a token was yielded: from here on, no retries
        attempt = 0
        while True:
            self._check_open()
            try:
                async with self._client.stream(
                    "POST", self._url, json=body, headers=headers, timeout=self._timeout
                ) as response:
                    if not response.is_success:
                        wait = self._status_failure(response, await _read_capped(response), attempt)
                    else:
                        if _is_json(response):
                            # The upstream ignored stream=true: one whole reply.
                            await response.aread()
                            gen = _parse_completion(response)
                            if gen.content:
                                yield GenerationChunk(content=gen.content)
                            yield GenerationChunk(
                                finish_reason=gen.finish_reason,
                                prompt_tokens=gen.prompt_tokens,
                                completion_tokens=gen.completion_tokens,
                                tool_calls=gen.tool_calls,
                            )
                            return
                        state = _StreamState()
                        try:
                            async for event in iter_events(iter_lines(response.aiter_bytes())):
                                for piece in state.feed(event):
                                    started = True
                                    yield GenerationChunk(content=piece)
                                if state.done:
                                    break
                        except httpx.TransportError:
                            if state.finish_reason is None:
                                raise
                            # The reply was over; only the usage chunk or [DONE] was lost.
                        if not state.done and state.finish_reason is None:
                            raise _Truncated("the stream ended before the reply finished")
                        yield state.last_chunk()
                        return
            except httpx.TimeoutException as exc:
                if started or not self._retry_timeout(exc, attempt):
                    raise self._timeout_error(exc) from exc
                wait = self._delay(attempt)
            except (httpx.NetworkError, httpx.RemoteProtocolError, _Truncated) as exc:
                if started:
                    raise BackendUnavailableError(
                        f"lost the connection to {self.base_url} mid-reply: {exc}"
                    ) from exc
                if attempt >= self._max_retries:
                    raise self._unavailable(exc, attempt) from exc
                wait = self._delay(attempt)
            except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, RuntimeError) as exc:
                raise BackendError(f"request to {self.base_url} failed: {exc!r}") from exc
            attempt += 1
            await _sleep(wait)

    async def ping(self) -> None:
        """Raise BackendError unless the upstream answers ``GET {base_url}/models``
        (a 404 or 405 counts as an answer: some gateways serve chat only). For
        readiness checks; the caller bounds the wait."""
        self._check_open()
        headers = {k: v for k, v in self._headers.items() if k != "Accept"}
        try:
            url = f"{self.base_url}/models"
            response = await self._client.get(url, headers=headers, timeout=self._timeout)
        except httpx.TimeoutException as exc:
            raise self._timeout_error(exc) from exc
        except httpx.HTTPError as exc:
            raise self._unavailable(exc, 0) from exc
        if response.status_code >= 400 and response.status_code not in (404, 405):
            raise BackendError(f"{self.base_url} answered {response.status_code} to GET /models")

    async def aclose(self) -> None:
        """Close the client if the backend built it; a passed-in client stays open."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    # -- helpers -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self!r} is closed")

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        messages = [_message_json(m) for m in request.messages]
        body: dict[str, Any] = {
            **request.params,
            "model": request.model,
            "messages": messages,
            request.budget_field: request.max_new_tokens,
            "stream": stream,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if stream and self._include_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def _request_headers(self, request: GenerationRequest) -> dict[str, str]:
        if request.request_id is None:
            return self._headers
        # vLLM and others tag their logs with it; the fake upstream keys on it.
        return {**self._headers, "X-Request-ID": request.request_id}

    def _delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self._max_backoff)
        base = min(self._backoff * 2.0**attempt, self._max_backoff)
        return base * random.uniform(0.5, 1.0)  # jitter, not crypto

    def _retry_timeout(self, exc: httpx.TimeoutException, attempt: int) -> bool:
        # Only a connect timeout is safe to retry: nothing reached the upstream.
        return isinstance(exc, httpx.ConnectTimeout) and attempt < self._max_retries

    def _timeout_error(self, exc: httpx.TimeoutException) -> BackendTimeoutError:
        what = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else "waiting for"
        return BackendTimeoutError(f"timed out {what} {self.base_url} ({type(exc).__name__})")

    def _unavailable(self, exc: Exception, attempt: int) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"cannot reach {self.base_url} after {attempt + 1} attempt(s): {exc!r}"
        )

    def _status_failure(self, response: httpx.Response, content: bytes, attempt: int) -> float:
        """The wait before retrying a 429/5xx answer; raises when there is no retry."""
        status = response.status_code
        message = f"{self._url} answered {status}: {_error_message(content, response.reason_phrase)}"
        if status != 429 and status < 500:
            raise BackendError(message)
        retry_after = _retry_after(response.headers.get("Retry-After"))
        if attempt >= self._max_retries:
            message = f"{message} (after {attempt + 1} attempt(s))"
            if status == 429:
                raise BackendRateLimitedError(message, retry_after=retry_after)
            raise BackendUnavailableError(message)
        return self._delay(attempt, retry_after)


def _message_json(m: PromptMessage) -> dict[str, Any]:
    """A prompt message in OpenAI's request shape."""
    content: Any = m.content
    if m.parts is not None:
        content = [p.model_dump(mode="json", exclude_none=True) for p in m.parts]
    message: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        message["name"] = m.name
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if not m.content:
            message["content"] = None  # what OpenAI sends for a reply that only calls tools
    return message


class _StreamState:
    """What a chat.completion.chunk stream has said so far."""

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        # Tool calls arrive in pieces keyed by index: id and name once, the
        # arguments' JSON text in fragments to concatenate.
        self.calls: dict[int, dict[str, str]] = {}

    def feed(self, event: ServerSentEvent) -> list[str]:
        """The content pieces in one event; raises BackendError for an error event."""
        if event.data == "[DONE]":
            self.done = True
            return []
        try:
            payload = json.loads(event.data)
        except ValueError as exc:
            raise BackendError(f"the upstream sent a non-JSON data line: {event.data[:200]!r}") from exc
        if not isinstance(payload, dict):
            raise BackendError(f"the upstream sent an unexpected data line: {event.data[:200]!r}")
        if event.event == "error" or payload.get("error"):
            raise BackendError(f"the upstream failed mid-stream: {_message_of(payload)}")
        self._usage(payload.get("usage"))
        pieces: list[str] = []
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                pieces.append(content)
            if isinstance(delta, dict):
                self._tool_calls(delta.get("tool_calls"))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return pieces

    def _usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.completion_tokens = _count(usage.get("completion_tokens"))

    def _tool_calls(self, deltas: object) -> None:
        for n, d in enumerate(deltas if isinstance(deltas, list) else ()):
            if not isinstance(d, dict):
                continue
            index = d.get("index", n)
            key = index if isinstance(index, int) else n
            call = self.calls.setdefault(key, {"name": "", "arguments": ""})
            if isinstance(d.get("id"), str):
                call["id"] = d["id"]
            function = d.get("function")
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    if isinstance(function.get(key), str):
                        call[key] += function[key]

    def last_chunk(self) -> GenerationChunk:
        calls = _tool_calls(
            [
                {"id": c.get("id"), "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in (self.calls[i] for i in sorted(self.calls))
            ]
        )
        return GenerationChunk(
            finish_reason=_finish_reason(self.finish_reason, calls),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            tool_calls=calls,
        )


def _tool_calls(raw: object) -> tuple[ToolCall, ...] | None:
    """An upstream message's tool calls, checked; None when there are none."""
    if not raw:
        return None
    calls = []
    for item in raw if isinstance(raw, list) else ():
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            raise BackendError(f"the upstream sent a tool call without a function: {item!r:.200}")
        try:
            calls.append(
                ToolCall(
                    # A server that sends no id still needs one for its results to answer.
                    id=item.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    function=FunctionCall(
                        name=function.get("name"), arguments=function.get("arguments") or ""
                    ),
                )
            )
        except ValidationError as exc:
            raise BackendError(f"the upstream sent a malformed tool call: {item!r:.200}") from exc
    return tuple(calls) or None


def _finish_reason(value: object, calls: tuple[ToolCall, ...] | None = None) -> FinishReason:
    # content_filter, function_call, null at the end: the reply is over.
    if calls:
        return "tool_calls"  # some servers say "stop" with tool calls; the calls decide
    return "length" if value == "length" else "stop"


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _is_json(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.split(";")[0].strip().lower() == "application/json"


def _parse_completion(response: httpx.Response) -> Generation:
    try:
        payload = response.json()
        choice = payload["choices"][0]
        message = choice.get("message") or {}
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise TypeError("message.content is not a string")
        calls = _tool_calls(message.get("tool_calls"))
    except (ValueError, LookupError, TypeError, AttributeError) as exc:
        raise BackendError(
            f"the upstream answered with an unexpected body ({exc!r}): {response.text[:200]!r}"
        ) from exc
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    return Generation(
        content=content,
        finish_reason=_finish_reason(choice.get("finish_reason"), calls),
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        tool_calls=calls,
    )


async def _read_capped(response: httpx.Response) -> bytes:
    """At most ``_MAX_ERROR_BODY`` bytes of an error body."""
    content = b""
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) >= _MAX_ERROR_BODY:
            break
    return content[:_MAX_ERROR_BODY]


def _message_of(payload: object) -> str:
    """The error text from OpenAI's, FastAPI's or DB-GPT's error shapes."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        for key in ("message", "detail", "err_msg"):
            if payload.get(key):
                return str(payload[key])[:_MAX_ERROR_TEXT]
    return json.dumps(payload)[:_MAX_ERROR_TEXT]


def _error_message(content: bytes, reason: str) -> str:
    try:
        return _message_of(json.loads(content))
    except ValueError:
        text = content.decode("utf-8", "replace").strip()
        return text[:_MAX_ERROR_TEXT] or reason


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer
