"""DB-GPT's result envelope for the ``/api/v2/serve/...`` routers.

Success: ``{"success": true, "err_code": null, "err_msg": null, "data": ...}``.
Failure: ``{"success": false, "err_code": "...", "err_msg": "...", "data": null}``
with a 4xx for bad input (validation 400, unknown ids 404, a name or code
already taken 409)
and the HTTP adapter's table for everything else.

The routers use :class:`EnvelopeRoute`, which answers every error raised
while handling a request (body validation, the API-key dependency, the
registries) in that shape, whatever app includes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, Literal, TypeVar

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from convcore.errors import ConvcoreError, InvalidRequestError
from convcore_server.openapi_doc import Envelope, error_responses

from .base import DuplicateError, NotFoundError

__all__ = [
    "EnvelopeRoute",
    "ErrorEnvelope",
    "Page",
    "answer",
    "created",
    "error_envelope",
    "link",
    "ok",
    "page_of",
    "scene_errors",
    "schema_of",
]

log = logging.getLogger("convcore_scenes")


class ErrorEnvelope(BaseModel):
    """The body of every failed request on these routes."""

    model_config = ConfigDict(title="ErrorEnvelope")

    success: Literal[False]
    err_code: str
    err_msg: str
    data: None


# What any route here may answer: a bad parameter or body, a missing key, a failing store.
_ALWAYS = (400, 401, 500, 503)


def scene_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for the error statuses a route answers (those
    every route answers, and ``statuses``), each with the envelope's schema."""
    return error_responses(*sorted({*_ALWAYS, *statuses}), model=ErrorEnvelope)


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON Schema (as it validates) with its ``$defs`` inlined,
    for a request body a route reads itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**inline(defs[ref.removeprefix("#/$defs/")]), **inline(rest)}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def link(path: str, method: str, body: Any = None, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to the operation ``method path``, its ``parameters``
    (and fields of its ``body``) taken from the response (``"$response.body#/data/id"``)."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    found: dict[str, Any] = {"operationRef": f"#/paths/{pointer}/{method.lower()}", "parameters": parameters}
    if body is not None:
        found["requestBody"] = body
    return found


def answer(
    data: Any, what: str, links: dict[str, dict[str, Any]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The success response: ``data`` (a model, or a type such as
    ``list[Model]``) in the envelope, linked to the operations that use the
    id it carries (``links``, for an operation that creates ``what``)."""
    found: dict[str, Any] = {"model": Envelope[data], "description": f"The {what}, in the envelope's data"}
    if links:
        found["links"] = links
    return {200: found}


def created(what: str, links: dict[str, dict[str, Any]], data: Any) -> dict[int | str, dict[str, Any]]:
    """The success response of an operation that creates ``what`` (``data``,
    as :func:`answer` takes it), linked to the operations that use its id."""
    return answer(data, what, links)


def ok(data: Any) -> dict[str, Any]:
    return {"success": True, "err_code": None, "err_msg": None, "data": data}


ItemT = TypeVar("ItemT")


class Page(BaseModel, Generic[ItemT]):
    """DB-GPT's paged list: one page of records and the totals (built by page_of)."""

    items: list[ItemT] = Field(description="The records of this page")
    total_count: int = Field(description="How many records there are in all")
    total_pages: int
    page: int = Field(description="This page's number, from 1")
    page_size: int


def page_of(items: Sequence[Any], page: int, page_size: int) -> dict[str, Any]:
    """DB-GPT's paged list (:class:`Page`): ``items`` of page ``page`` (1-based) and the totals."""
    page = max(page, 1)
    page_size = max(min(page_size, 1000), 1)
    start = (page - 1) * page_size
    total = len(items)
    return {
        "items": list(items[start : start + page_size]),
        "total_count": total,
        "total_pages": (total + page_size - 1) // page_size,
        "page": page,
        "page_size": page_size,
    }


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header")]
    field = ".".join(loc) or None
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return (f"{field}: {msg}" if field else msg), field


def _status(exc: BaseException) -> tuple[int, str, str]:
    """HTTP status, err_code and err_msg for ``exc``."""
    if isinstance(exc, NotFoundError):
        return 404, "not_found", str(exc)
    if isinstance(exc, DuplicateError):
        return 409, "duplicate", str(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        message, _ = _validation_message(exc.errors())
        return 400, "invalid_request", message
    if isinstance(exc, HTTPException):
        # FastAPI and Starlette wrap errors met while reading the body (the body
        # limit's PayloadTooLargeError, a RecursionError from deep JSON, bad
        # multipart) in a Starlette HTTPException: answer the cause where it is ours.
        if isinstance(exc.__cause__, ConvcoreError):
            return _status(exc.__cause__)
        code = "invalid_request" if exc.status_code == 400 else "http_error"
        return exc.status_code, code, str(exc.detail)
    try:
        from convcore_server import classify
    except ImportError:  # pragma: no cover - the routers normally run inside the server
        if isinstance(exc, InvalidRequestError):
            return 400, "invalid_request", str(exc)
        if isinstance(exc, ConvcoreError):
            return 500, "internal_error", str(exc)
        return 500, "internal_error", "internal server error"
    kind = classify(exc)
    message = str(exc) if isinstance(exc, ConvcoreError) else "internal server error"
    return kind.status, kind.code, message


def error_envelope(exc: BaseException) -> JSONResponse:
    status, code, message = _status(exc)
    if status >= 500:
        log.error("serve API failed: %s", type(exc).__name__, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"success": False, "err_code": code, "err_msg": message, "data": None}
    return JSONResponse(body, status_code=status, headers=headers)


class EnvelopeRoute(APIRoute):
    """An APIRoute whose errors are answered as DB-GPT result envelopes.

    Its answers are the handler's dicts as they are: the document takes the
    success body from the route's ``responses`` (:func:`answer`), not from
    the handler's return annotation."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        kwargs["response_model"] = None
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def enveloped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_envelope(exc)

        return enveloped
