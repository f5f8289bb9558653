"""Health, metrics, tracing and request ids, wired into one app.

:class:`Observability` says what an app exposes; :meth:`Observability.install`
adds one plain ASGI middleware that, for every request:

- takes the ``X-Request-Id`` (or mints one) and sends it back;
- installs a :class:`RequestObserver` as the engine's observer
  (:mod:`convcore.observe`) and as the logging context, so each log line
  and span of the request carries its request id and ``span_id``;
- records the metrics of a chat turn when it ends: outcome and chat mode,
  duration, time to first token, store and generation times, tokens, error
  codes, open streams.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convcore.observe import Attr, Span, observing

from .context import ServerContext
from .errors import CLIENT_CLOSED_REQUEST, AuthenticationError
from .headers import raw_header
from .health import build_health_router
from .logs import SCOPE_KEY, RequestContext, current_request, request_id_from
from .metrics import CONTENT_TYPE, Metrics, pool_usage
from .tracing import OTelTracing

__all__ = ["Observability", "RequestObserver"]

_CHAT_SUFFIX = "/chat/completions"


@dataclass(frozen=True)
class Observability:
    """What an app exposes about itself.

    ``metrics``: serve ``/metrics`` (Prometheus text). ``metrics_key``: a
    Bearer key only for ``/metrics`` (a scraper's); without one, ``/metrics``
    takes the API keys not bound to a user (or nothing, when the app allows
    anonymous use). ``tracing``: OpenTelemetry spans (needs the ``otel``
    extra), from ``tracer`` if given, else from the global tracer provider.
    ``ready_timeout``: seconds each ``/readyz`` check may take.
    """

    metrics: bool = True
    metrics_key: str | None = None
    tracing: bool = False
    ready_timeout: float = 2.0
    tracer: Any = None

    def router(self, ctx: ServerContext) -> APIRouter:
        return build_health_router(ctx.engine, self.ready_timeout)

    def install(self, app: FastAPI, ctx: ServerContext) -> None:
        metrics = Metrics(lambda: pool_usage(ctx.engine.store)) if self.metrics else None
        tracing = OTelTracing(self.tracer) if self.tracing else None
        app.state.metrics = metrics
        if metrics is not None:
            key = self.metrics_key

            @app.get("/metrics", include_in_schema=False)
            async def metrics_endpoint(request: Request) -> Response:
                _check_metrics_key(request, ctx, key)
                return Response(metrics.render(), media_type=CONTENT_TYPE)

        app.add_middleware(ObservabilityMiddleware, metrics=metrics, tracing=tracing)


def _check_metrics_key(request: Request, ctx: ServerContext, key: str | None) -> None:
    if key is not None:
        sent = request.headers.get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise AuthenticationError("invalid metrics key: send 'Authorization: Bearer <metrics key>'")
        return
    ctx.auth.check(request)
    if ctx.auth.user_of(request) is not None:
        raise AuthenticationError("a key bound to a user cannot read the service's metrics")


class RequestObserver:
    """One request's observer: spans to metrics and OpenTelemetry, facts to its context."""

    def __init__(self, context: RequestContext, metrics: Metrics | None, tracing: OTelTracing | None) -> None:
        self.context = context
        self.metrics = metrics
        self.tracing = tracing
        self.request_span: Any = None
        self.first_token_at: float | None = None

    def start_span(self, name: str, attributes: Mapping[str, Attr]) -> AbstractContextManager[Span]:
        return _SpanBlock(self, name, attributes)

    def annotate(self, attributes: Mapping[str, Attr]) -> None:
        self.context.attributes.update(attributes)

    def _timed(self, name: str, seconds: float, attributes: Mapping[str, Any]) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        if name.startswith("convcore.store."):
            metrics.child(metrics.store_seconds, name.removeprefix("convcore.store.")).observe(seconds)
        elif name == "convcore.generate":
            metrics.child(metrics.generation_seconds, str(attributes.get("model", ""))).observe(seconds)


class _SpanBlock:
    """One span of a turn, and the :class:`~convcore.observe.Span` its block
    gets: timed into the metrics when it ends, an OpenTelemetry child of the
    request's span when tracing is on. A plain class, not a generator
    function: a turn opens four of these."""

    __slots__ = ("attributes", "extra", "name", "otel", "owner", "started", "traced")

    def __init__(self, owner: RequestObserver, name: str, attributes: Mapping[str, Attr]) -> None:
        self.owner = owner
        self.name = name
        self.attributes = attributes
        self.otel: Any = None
        self.traced: AbstractContextManager[Any] | None = None
        self.extra: dict[str, Attr] = {}

    def __enter__(self) -> Span:
        self.started = time.perf_counter()
        owner = self.owner
        if owner.tracing is not None and owner.request_span is not None:
            self.traced = owner.tracing.child(owner.request_span, self.name, self.attributes)
            try:
                self.otel = self.traced.__enter__()
            except BaseException:
                self.traced = None
                self._record()
                raise
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        try:
            return self.traced.__exit__(*exc) if self.traced is not None else None
        finally:
            self._record()

    def _record(self) -> None:
        seconds = time.perf_counter() - self.started
        extra = self.extra
        self.owner._timed(self.name, seconds, {**self.attributes, **extra} if extra else self.attributes)

    def set_attribute(self, key: str, value: Attr) -> None:
        self.extra[key] = value
        if self.otel is not None:
            self.otel.set_attribute(key if "." in key else f"convcore.{key}", value)

    def add_event(self, name: str) -> None:
        if name == "first_token" and self.owner.first_token_at is None:
            self.owner.first_token_at = time.perf_counter()
        if self.otel is not None:
            self.otel.add_event(name)


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics | None, tracing: OTelTracing | None) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = raw_header(scope, b"x-request-id")
        context = RequestContext(request_id_from(header.decode("latin-1") if header is not None else None))
        scope[SCOPE_KEY] = context
        observer = RequestObserver(context, self.metrics, self.tracing)
        path: str = scope.get("path", "")
        chat = path.endswith(_CHAT_SUFFIX)
        if self.tracing is not None:
            observer.request_span = self.tracing.start_request(
                f"{scope.get('method', '')} {path if chat else 'other'}",
                {
                    "http.request.method": scope.get("method", ""),
                    "url.path": path,
                    "convcore.request_id": context.request_id,
                },
            )
        status = 0
        streaming = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", context.request_id.encode("latin-1")))
                message = {**message, "headers": headers}
                for key, value in headers:
                    if value.startswith(b"text/event-stream") and key.lower() == b"content-type":
                        streaming = True
                        if self.metrics is not None:
                            self.metrics.open_streams.inc()
                        break
            await send(message)
            if status == CLIENT_CLOSED_REQUEST and message["type"] == "http.response.start":
                _log_client_gone(scope)

        token = current_request.set(context)
        try:
            with observing(observer):
                await self.app(scope, receive, send_with_id)
        except Exception:
            if status == 0:  # answered 500 by the outermost handler, after us
                status = 500
                context.attributes.setdefault("error_code", "internal_error")
            raise
        finally:
            current_request.reset(token)
            if streaming and self.metrics is not None:
                self.metrics.open_streams.dec()
            self._finish(observer, chat, status, streaming)

    def _finish(self, observer: RequestObserver, chat: bool, status: int, streaming: bool) -> None:
        attrs = observer.context.attributes
        code = attrs.get("error_code")
        if self.metrics is not None:
            if isinstance(code, str):
                self.metrics.child(self.metrics.errors, code).inc()
            if chat:
                self._record_turn(observer, status, streaming)
        if self.tracing is not None and observer.request_span is not None:
            self.tracing.finish_request(
                observer.request_span, status, {**attrs, "convcore.request_id": observer.context.request_id}
            )

    def _record_turn(self, observer: RequestObserver, status: int, streaming: bool) -> None:
        assert self.metrics is not None
        attrs = observer.context.attributes
        mode = str(attrs.get("chat_mode") or "unknown")
        code = attrs.get("error_code")
        outcome = str(code) if isinstance(code, str) else attrs.get("outcome")
        if outcome is None:
            # The client left: before the answer began (no status, or the 499
            # a stream answers when its client went away before its first
            # token) or during it. Either way the turn was abandoned.
            left = 200 <= status < 300 or status in (0, CLIENT_CLOSED_REQUEST)
            outcome = "abandoned" if left else f"http_{status}"
        metrics = self.metrics
        metrics.child(metrics.turns, str(outcome), mode).inc()
        elapsed = time.perf_counter() - observer.context.started
        metrics.child(metrics.turn_seconds, mode, "true" if streaming else "false").observe(elapsed)
        if observer.first_token_at is not None and streaming:
            metrics.child(metrics.first_token_seconds, mode).observe(
                observer.first_token_at - observer.context.started
            )
        if outcome == "ok":
            for direction, key in (("in", "prompt_tokens"), ("out", "completion_tokens")):
                value = attrs.get(key)
                if isinstance(value, int):
                    metrics.child(metrics.tokens, direction).inc(value)


_access = logging.getLogger("uvicorn.access")


def _log_client_gone(scope: Scope) -> None:
    """The access line of a request whose client left before its answer:
    uvicorn writes none for a closed connection, and an operator looks for
    the 499 there. Its format and filters are uvicorn's own."""
    client = scope.get("client")
    address = f"{client[0]}:{client[1]}" if client else "-"
    path = scope.get("root_path", "") + scope.get("path", "")
    query = scope.get("query_string", b"")
    if query:
        path = f"{path}?{query.decode('latin-1')}"
    _access.info(
        '%s - "%s %s HTTP/%s" %d',
        address,
        scope.get("method", ""),
        path,
        scope.get("http_version", "1.1"),
        CLIENT_CLOSED_REQUEST,
    )
