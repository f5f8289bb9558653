"""What the OpenAPI document says about answers: body models and ``responses``.

Routers describe every status they can answer with :func:`error_responses`,
naming the error body's model (the service's own :class:`ErrorBody` by
default; a router with another envelope passes its model)::

    @router.get("/things/{id}", response_model=Envelope[Thing],
                responses=error_responses(400, 404, model=MyErrorBody))

:class:`Envelope` is DB-GPT's ``{success, err_code, err_msg, data}`` around
any model; :data:`BEARER` is the security requirement of keyed operations
(the scheme itself is declared by the key check, see :mod:`.auth`).
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode

__all__ = [
    "BEARER",
    "BEARER_SCHEME",
    "EMPTY_TEXT",
    "STATUS_DESCRIPTIONS",
    "DBGPTErrorBody",
    "Envelope",
    "ErrorBody",
    "ErrorDetail",
    "KnowledgeErrorBody",
    "at_least_one",
    "error_responses",
    "json_body",
    "sse_content",
]

BEARER_SCHEME = "bearerAuth"
# An operation's ``security``: the API key as ``Authorization: Bearer <key>``.
BEARER: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}]

STATUS_DESCRIPTIONS = {
    400: "Invalid request: the body or a parameter is wrong (the message says which and why)",
    401: "Missing or unknown API key",
    403: "The key may not act for this user, or the thing belongs to another user",
    404: "No such thing",
    405: "Method not allowed",
    409: "Conflict with what is stored",
    413: "The request body is larger than the service accepts",
    429: "The model backend is rate limited",
    500: "Internal error",
    502: "The model backend failed",
    503: "The store (or a backend) is unavailable",
    504: "The model backend did not answer in time",
}


class ErrorDetail(BaseModel):
    """OpenAI's ``error`` object."""

    model_config = ConfigDict(title="ErrorDetail")

    message: str
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error")
    param: str | None = Field(description="The request field at fault, if one is")
    code: str = Field(description="The same as err_code")


class DBGPTErrorBody(BaseModel):
    """An error in DB-GPT's envelope: what every error body of the service
    carries (the server's own routes add OpenAI's ``error``: :class:`ErrorBody`)."""

    model_config = ConfigDict(title="DBGPTErrorBody")

    success: Literal[False]
    err_code: str = Field(description="Machine-readable, e.g. invalid_request, conversation_not_found")
    err_msg: str
    data: None


class ErrorBody(DBGPTErrorBody):
    """An error in both dialects: DB-GPT's envelope and OpenAI's ``error``."""

    model_config = ConfigDict(title="ErrorBody")

    error: ErrorDetail


class KnowledgeErrorBody(BaseModel):
    """An error of the knowledge-base API: its envelope without ``data``."""

    model_config = ConfigDict(title="KnowledgeErrorBody")

    code: int = Field(
        description="1000001 unauthorized, 1000002 no permission, 1000003 invalid request; else the status"
    )
    message: str
    request_id: str


DataT = TypeVar("DataT")


class Envelope(BaseModel, Generic[DataT]):
    """DB-GPT's result envelope: ``{success, err_code, err_msg, data}``."""

    success: bool
    err_code: str | None
    err_msg: str | None
    data: DataT


def error_responses(*statuses: int, model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for ``statuses``, each answered with a JSON ``model``."""
    return {
        status: {"model": model, "description": STATUS_DESCRIPTIONS.get(status, "Error")}
        for status in statuses
    }


# Models the document refers to by name without FastAPI knowing them:
# request bodies as they are read (validation), events as they are sent
# (serialization).
_BODY_MODELS: dict[str, tuple[type[BaseModel], JsonSchemaMode]] = {}


# "" as a schema: a string of length 0, not ``{"const": ""}``, which client
# generators try before the other strings of a union and so refuse every text.
EMPTY_TEXT: dict[str, Any] = {"type": "string", "maxLength": 0}


def at_least_one(*alternatives: dict[str, Any]) -> dict[str, Any]:
    """A rule that an object matches one of ``alternatives`` or more, to put
    beside its ``properties`` (``{**schema, **at_least_one(...)}``). Written
    as "not none of them": an ``anyOf`` there reads to client generators as
    a union of other objects, and they skip the operation."""
    return {"not": {"allOf": [{"not": one} for one in alternatives]}}


def json_body(body: type[BaseModel] | dict[str, Any], **more: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself (not
    through a FastAPI parameter): the body is ``body``, the model that
    validates it (:func:`finish_document` puts its schema into the
    components), or a schema built for how the service is set up (its
    models, scenes, SQLite roots); ``more`` are the other media types the
    route reads (a form, an upload), each with its ``content`` entry."""
    if isinstance(body, dict):
        schema = body
    else:
        _BODY_MODELS[_name(body)] = (body, "validation")
        schema = _ref(_name(body))
    content = {"application/json": {"schema": schema}, **more}
    return {"requestBody": {"required": True, "content": content}}


def sse_content(description: str, *events: type[BaseModel]) -> dict[str, Any]:
    """The ``content`` entry of a Server-Sent Events answer whose events each
    carry one of ``events`` as JSON in ``data``, the last one ``[DONE]``."""
    for event in events:
        _BODY_MODELS[_name(event)] = (event, "serialization")
    json_event = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(_name(event)) for event in events]},
    }
    data = {"anyOf": [{"const": "[DONE]"}, json_event], "description": description}
    event_schema = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"text/event-stream": {"schema": event_schema}}


def _name(model: type[BaseModel]) -> str:
    """A hand-added model's name in the components: its title, else its class name."""
    return model.model_config.get("title") or model.__name__


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _add_model(
    components: dict[str, Any], model: type[BaseModel], name: str, mode: JsonSchemaMode
) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    for def_name, definition in schema.pop("$defs", {}).items():
        components.setdefault(def_name, definition)
    components[name] = schema


def finish_document(schema: dict[str, Any]) -> dict[str, Any]:
    """What FastAPI's generator does not know about this service, put into ``schema``:

    - the bodies of routes that read JSON themselves (:func:`json_body`);
    - no FastAPI 422: the service answers a parameter that fails validation
      with 400 (each route declares its 400, in its own error body);
    - every keyed operation may answer 401: routes that do not say it in
      what body get :class:`DBGPTErrorBody`, the envelope every error body of
      the service carries (a router's own envelope may answer the app's key check).
    """
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, (model, mode) in _BODY_MODELS.items():
        _add_model(components, model, name, mode)
    _add_model(components, DBGPTErrorBody, "DBGPTErrorBody", "serialization")
    error = {"application/json": {"schema": _ref("DBGPTErrorBody")}}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if operation.get("security") and "401" not in responses:
                responses["401"] = {"description": STATUS_DESCRIPTIONS[401], "content": error}
    text = str(schema.get("paths"))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"/{unused}'" not in text:
            components.pop(unused, None)
    return schema
