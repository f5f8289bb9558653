"""The ASGI app factory: :func:`create_app` wires an engine to HTTP.

Routes (all behind the API key except ``/healthz``)::

    POST   /api/v2/chat/completions            DB-GPT / OpenAI chat, stream or not
    GET    /api/v2/models                      OpenAI model list
    GET    /api/v2/models/{model}
    GET    /api/v2/conversations               list (user_name, sys_code, limit, offset)
    GET    /api/v2/conversations/{conv_uid}    metadata + messages (start_seq, limit)
    DELETE /api/v2/conversations/{conv_uid}
    POST   /api/knowledge/chat/completions     knowledge-base envelope (its own 401)
    GET    /healthz, /readyz                   liveness; readiness (store and backends reachable)
    GET    /metrics                            Prometheus exposition (optional, may need a key)

More routers (for example ``/api/v2/serve/...``) join through
``extra_routers``: each an ``APIRouter`` or a function taking the
:class:`ServerContext` and returning one; they are included behind the key
check, and the app's error table answers their ``ConvcoreError``\\ s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from convcore import (
    BackendRateLimitedError,
    ConvcoreError,
    Engine,
    InvalidRequestError,
)
from convcore.observe import annotate

from .auth import APIKeyAuth
from .body import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from .context import DEFAULT_MAX_MESSAGE_CHARS, ServerContext
from .errors import AuthenticationError, RouteNotFoundError, classify, error_body
from .observability import Observability
from .openapi_doc import finish_document
from .routes_chat import answer_chat, build_chat_router, describe_chat_request
from .routes_conversations import build_conversations_router
from .routes_knowledge import build_knowledge_router
from .routes_models import build_models_router
from .turn_door import TurnDoor

__all__ = ["API_PREFIX", "RouterSource", "create_app", "error_response"]

API_PREFIX = "/api/v2"

log = logging.getLogger("convcore_server")

RouterSource = APIRouter | Callable[[ServerContext], APIRouter]


def error_response(exc: BaseException) -> JSONResponse:
    """``exc`` answered by the one table, as JSON."""
    kind = classify(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, BackendRateLimitedError) and exc.retry_after is not None:
        headers["Retry-After"] = str(math.ceil(exc.retry_after))
    return JSONResponse(error_body(exc, kind), status_code=kind.status, headers=headers)


def create_app(
    engine: Engine,
    *,
    api_keys: Iterable[str] | None = None,
    user_keys: Mapping[str, str] | None = None,
    allow_anonymous: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
    extra_routers: Sequence[RouterSource] = (),
    close_engine: bool = False,
    title: str = "convcore",
    docs: Literal["public", "keyed", "off"] = "public",
    observability: Observability | None = None,
) -> FastAPI:
    """An app serving ``engine``; mount it anywhere or run it with uvicorn.

    Without ``api_keys`` (or ``user_keys``, keys bound to a user_name) you
    must pass ``allow_anonymous=True``. The engine
    is not closed by the app unless ``close_engine=True`` (then at lifespan
    shutdown; a mounted sub-app gets no lifespan, so close it yourself).

    ``docs``: ``/docs``, ``/redoc`` and ``/openapi.json`` served to anyone
    (``public``), only with an API key (``keyed``), or not at all (``off``).
    ``observability``: health checks, metrics and tracing (see
    :class:`~convcore_server.observability.Observability`); ``/healthz`` and
    ``/readyz`` are always there.
    """
    auth = APIKeyAuth(api_keys, user_keys=user_keys, allow_anonymous=allow_anonymous)
    ctx = ServerContext(
        engine=engine, auth=auth, max_body_bytes=max_body_bytes, max_message_chars=max_message_chars
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine:
            await engine.aclose()

    public_docs = docs == "public"
    app = FastAPI(
        title=title,
        lifespan=lifespan,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
        openapi_url="/openapi.json" if public_docs else None,
        generate_unique_id_function=operation_id,
    )
    app.state.convcore = ctx
    # Innermost, so the body limit and observability wrap it as they wrap the routes.
    chat_path = f"{API_PREFIX}/chat/completions"
    app.add_middleware(TurnDoor, owner=app, ctx=ctx, path=chat_path, answer=answer_chat)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    _install_error_handlers(app)

    keyed = [Depends(ctx.require_api_key)]
    for build in (build_chat_router, build_models_router, build_conversations_router):
        app.include_router(build(ctx), prefix=API_PREFIX, dependencies=keyed)
    app.include_router(build_knowledge_router(ctx))
    for source in extra_routers:
        router = source if isinstance(source, APIRouter) else source(ctx)
        app.include_router(router, dependencies=keyed)

    if docs == "keyed":
        _add_keyed_docs(app, keyed)
    observe = observability or Observability()
    app.include_router(observe.router(ctx))
    observe.install(app, ctx)
    _document(app, ctx)
    return app


def operation_id(route: APIRoute) -> str:
    """A route's operationId is its handler's name (``read_conversation``), so a
    client generated from the document has methods named as the routes are."""
    return route.name


def _add_keyed_docs(app: FastAPI, keyed: list[Any]) -> None:
    """The API description and its browser page, behind the API key."""
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=keyed)
    async def swagger() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")


def _install_error_handlers(app: FastAPI) -> None:
    async def on_convcore(request: Request, exc: Exception) -> Response:
        if classify(exc).status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return error_response(exc)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        response = error_response(RouteNotFoundError(message, exc.status_code))
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
        return error_response(exc)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # Nothing can be answered and nothing was stored: one line, no traceback.
        log.info("%s %s: the client went away before its body arrived", request.method, request.url.path)
        annotate(outcome="abandoned")
        return Response(status_code=499)

    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(ConvcoreError, on_convcore)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path (Starlette's own
    ``Allow`` names only the first route that matched the path)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _validation_error(exc: RequestValidationError) -> InvalidRequestError:
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header")]
    return InvalidRequestError(str(first.get("msg", "invalid")), field=".".join(loc) or None)


def _document(app: FastAPI, ctx: ServerContext) -> None:
    """The OpenAPI document as FastAPI makes it, finished by :func:`finish_document`,
    with the chat requests narrowed to what ``ctx`` serves."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = finish_document(original())
            describe_chat_request(schema, ctx, "ChatRequest", "KnowledgeChatRequest")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
