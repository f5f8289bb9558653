"""``/api/v2/serve/awel/flows``: flows for chat_flow, in DB-GPT's FlowPanel shape.

::

    POST   /api/v2/serve/awel/flows             create
    PUT    /api/v2/serve/awel/flows/{uid}       update the fields sent
    GET    /api/v2/serve/awel/flows/{uid}
    GET    /api/v2/serve/awel/flows             data.items (name, uid, page, page_size filters)
    DELETE /api/v2/serve/awel/flows/{uid}       answers the deleted flow
    POST   /api/v2/serve/awel/flows/{uid}/run   run it: a chat body; streams unless "stream": false
    GET    /api/v2/serve/awel/nodes             the operators a flow's nodes may use

A key bound to a user lists, reaches and runs only that user's flows
(another's answer 404); an operator's key reaches all.

``flow_data`` is accepted as DB-GPT's node graph (``nodes``, ``edges``,
``viewport``; see :mod:`.flow_panel`) or as convcore's step list, and is
always answered as a node graph; ``steps`` carries the steps convcore runs.
``metadata`` names the run route as the flow's HTTP trigger, which is how
DB-GPT's client (``run_flow_cmd``) finds it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from convcore.answer_schema import sent_always
from convcore.errors import InvalidRequestError
from convcore.schema import NOT_BLANK
from convcore_server import ServerContext
from convcore_server.body import read_json_object
from convcore_server.openapi_doc import at_least_one, json_body

from .envelope import EnvelopeRoute, Page, answer, created, link, ok, page_of, scene_errors, schema_of
from .flow_panel import (
    FlowGraph,
    FlowMetadata,
    NodeMetadata,
    flow_data_from_steps,
    flow_metadata,
    node_catalog,
)
from .flows import MAX_STEPS, Flow, FlowChange, FlowCreate, FlowHead, FlowRegistry, FlowStep

__all__ = ["FlowPanel", "build_flow_run_router", "build_flows_router", "flow_panel_json"]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _if_set(description: str) -> Any:
    """A field of DB-GPT's FlowPanel that is sent only when the flow was given one (never null)."""
    return Field(default=None, description=description, json_schema_extra=_no_default)


class FlowPanel(FlowHead):
    """A flow as the API answers it: DB-GPT's FlowPanel (built by flow_panel_json)."""

    # The head's fields are in every answer; the panel's only when a client set them.
    __get_pydantic_json_schema__ = sent_always(*FlowHead.model_fields)

    # The flow's PANEL_FIELDS, as a client set them.
    error_message: str | SkipJsonSchema[None] = _if_set("Kept as sent")
    source: str | SkipJsonSchema[None] = _if_set("Kept as sent")
    source_url: str | SkipJsonSchema[None] = _if_set("Kept as sent")
    version: str | SkipJsonSchema[None] = _if_set("Kept as sent")
    define_type: str | SkipJsonSchema[None] = _if_set("Kept as sent")
    variables: list[dict[str, Any]] | SkipJsonSchema[None] = _if_set("Kept as sent")
    authors: list[str] | SkipJsonSchema[None] = _if_set("Kept as sent")
    flow_data: FlowGraph = Field(description="The node graph as sent, or the steps drawn as one")
    steps: list[FlowStep] = Field(description="The steps convcore runs, in order")
    metadata: FlowMetadata


def _run_path(prefix: str, uid: str) -> str:
    return f"{prefix}/awel/flows/{uid}/run"


def flow_panel_json(flow: Flow, prefix: str = "/api/v2/serve") -> dict[str, Any]:
    """A stored flow as DB-GPT's FlowPanel."""
    data = flow.public()
    steps = data.pop("flow_data")
    view = data.pop("view")
    panel = data.pop("panel")
    data.update(panel)
    data["flow_data"] = view if view is not None else flow_data_from_steps(flow.flow_data)
    data["steps"] = steps
    data["metadata"] = flow_metadata(_run_path(prefix, flow.uid))
    return data


_FLOW_DATA_DOC = (
    "The steps, in order: each a prompt step (`prompt`, or a string as its template) or a scene "
    "step (`scene`, with the `param` a scene such as chat_knowledge needs). DB-GPT's node graph "
    "(`nodes`, `edges`, `viewport`: a chain of convcore_prompt_step / convcore_scene_step operators, "
    'see `/awel/nodes`) and `{"steps": [...]}` are accepted too.'
)


def _step_schema(step: dict[str, Any], scenes: dict[str, bool] | None) -> dict[str, Any]:
    """A step: exactly one of ``prompt`` and ``scene``; a scene a step may
    name, with the param it needs (the scenes as the registry knows them)."""
    prompt = {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "scene": {"type": "null"}}}
    kinds: list[dict[str, Any]] = [prompt]
    if scenes is None:
        kinds.append(
            {
                "required": ["scene"],
                "properties": {
                    "scene": {"type": "string", "not": {"const": "chat_flow"}},
                    "prompt": {"type": "null"},
                },
            }
        )
    else:
        with_param = sorted(n for n, needs in scenes.items() if needs)
        free = sorted(n for n, needs in scenes.items() if not needs)
        if with_param:
            kinds.append(
                {
                    "required": ["scene", "param"],
                    "properties": {
                        "scene": {"enum": with_param},
                        "param": {"type": "string", "pattern": NOT_BLANK},
                        "prompt": {"type": "null"},
                    },
                }
            )
        if free:
            kinds.append(
                {"required": ["scene"], "properties": {"scene": {"enum": free}, "prompt": {"type": "null"}}}
            )
    return {**step, **at_least_one(*kinds)}


def flow_schema(model: type[FlowChange], scenes: dict[str, bool] | None) -> dict[str, Any]:
    """The JSON Schema of a flow body: ``model``'s, its steps as :func:`_step_schema` says."""
    schema = schema_of(model)
    steps = schema["properties"]["flow_data"]
    array = next(s for s in steps.get("anyOf", [steps]) if s.get("type") == "array")
    item = {"anyOf": [{"type": "string", "maxLength": 100_000}, _step_schema(array["items"], scenes)]}
    listed = {"type": "array", "items": item, "minItems": 1, "maxItems": MAX_STEPS}
    nullable = "anyOf" in steps
    schema["properties"]["flow_data"] = {
        **({"anyOf": [listed, {"type": "null"}]} if nullable else listed),
        "description": _FLOW_DATA_DOC,
    }
    return schema


def build_flows_router(flows: FlowRegistry, ctx: ServerContext, prefix: str = "/api/v2/serve") -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/awel", route_class=EnvelopeRoute, tags=["flows"])
    one = f"{prefix}/awel/flows/{{uid}}"
    by_uid = {"uid": "$response.body#/data/uid"}
    uses = {
        "GetFlow": link(one, "get", **by_uid),
        "UpdateFlow": link(one, "put", **by_uid),
        "DeleteFlow": link(one, "delete", **by_uid),
        "RunFlow": link(f"{one}/run", "post", **by_uid),
    }
    scenes = flows.step_scenes()

    def out(flow: Flow) -> dict[str, Any]:
        return ok(flow_panel_json(flow, prefix))

    @router.post(
        "/flows",
        summary="Create a flow",
        responses={**scene_errors(409, 413), **created("flow", uses, FlowPanel)},
        openapi_extra=json_body(flow_schema(FlowCreate, scenes)),
    )
    async def create_flow(request: Request) -> dict[str, Any]:
        body = FlowCreate.model_validate(await read_json_object(request))
        caller = ctx.caller(request, body.user_name, body.sys_code)
        return out(await flows.create(body, caller=caller))

    @router.put(
        "/flows/{uid}",
        summary="Update a flow",
        description="Changes the fields sent. A `uid` in the body must be the path's: it cannot change.",
        responses={**scene_errors(404, 409, 413), **answer(FlowPanel, "flow")},
        openapi_extra=json_body(flow_schema(FlowChange, scenes)),
    )
    async def update_flow(request: Request, uid: str) -> dict[str, Any]:
        sent = await read_json_object(request)
        if sent.get("uid") not in (None, uid):
            raise InvalidRequestError("does not match the flow in the path", field="uid")
        body = FlowChange.model_validate(sent)
        caller = ctx.caller(request, body.user_name)
        return out(await flows.update(uid, body, caller=caller))

    @router.get(
        "/flows/{uid}", summary="Get a flow", responses={**scene_errors(404), **answer(FlowPanel, "flow")}
    )
    async def get_flow(request: Request, uid: str) -> dict[str, Any]:
        return out(await flows.get(uid, caller=ctx.caller(request)))

    @router.get(
        "/flows",
        summary="List flows",
        responses={**scene_errors(), **answer(Page[FlowPanel], "page of flows")},
    )
    async def list_flows(
        request: Request,
        name: str | None = None,
        uid: str | None = None,
        page: int = 1,
        page_size: int = 20,
        user_name: str | None = None,
        sys_code: str | None = None,
    ) -> dict[str, Any]:
        caller = ctx.caller(request, user_name, sys_code)
        found = [flow_panel_json(f, prefix) for f in await flows.list(name=name, uid=uid, caller=caller)]
        return ok(page_of(found, page, page_size))

    @router.delete(
        "/flows/{uid}",
        summary="Delete a flow",
        responses={**scene_errors(404), **answer(FlowPanel, "deleted flow")},
    )
    async def delete_flow(request: Request, uid: str) -> dict[str, Any]:
        return out(await flows.delete(uid, caller=ctx.caller(request)))

    @router.get(
        "/nodes",
        summary="The operators a flow may use",
        responses={**scene_errors(), **answer(list[NodeMetadata], "operators")},
    )
    async def nodes() -> dict[str, Any]:
        return ok(node_catalog())

    return router


def run_schema() -> dict[str, Any]:
    """The run's body: the service's chat request, run as chat_flow on the
    flow in the path. ``chat_mode`` is not the client's to give (the path
    names the flow), and no OpenAI sampling parameter applies (a flow turn
    honours none, as any scene turn)."""
    from convcore.params import PASS_THROUGH
    from convcore_server.routes_chat import refused

    # Each limit is a rule beside the chat request's properties, not a second
    # definition of them: client generators cannot merge two types of a field.
    limits: dict[str, Any] = {"chat_mode": {"type": "null"}, **{p: refused(p) for p in PASS_THROUGH}}
    rules = [{"if": {"required": [p]}, "then": {"properties": {p: limit}}} for p, limit in limits.items()]
    return {
        "allOf": [{"$ref": "#/components/schemas/ChatRequest"}, *rules],
        "description": "A chat request without chat_mode (the flow in the path runs, as chat_flow; "
        "chat_param is ignored) and without sampling parameters; the reply streams (SSE) unless "
        "stream is false",
    }


def build_flow_run_router(
    flows: FlowRegistry, ctx: ServerContext, prefix: str = "/api/v2/serve"
) -> APIRouter:
    """The run route: a chat_flow turn on the flow in the path."""
    from convcore import ChatCompletion
    from convcore_server.context import conv_uid_header
    from convcore_server.routes_chat import (
        CLIENT_CLOSED_REQUEST,
        SSE_CONTENT,
        TURN_ERRORS,
        completion_json,
        request_from_body,
        started_events,
    )
    from convcore_server.sse import SSEResponse
    from convcore_server.stream_wire import StreamShape

    router = APIRouter(prefix=f"{prefix}/awel", route_class=EnvelopeRoute, tags=["flows"])
    answers = {
        200: {
            "model": ChatCompletion,
            "description": "The reply: chunks as Server-Sent Events, or with `stream: false` one completion",
            "content": SSE_CONTENT,
        },
        **scene_errors(*TURN_ERRORS),
    }

    @router.post(
        "/flows/{uid}/run",
        summary="Run a flow on a chat body (SSE unless stream is false)",
        response_model=None,
        responses=answers,
        openapi_extra=json_body(run_schema()),
    )
    async def run_flow(uid: str, request: Request) -> Response:
        raw = await read_json_object(request)
        user_name = raw.get("user_name")
        await flows.get(uid, caller=ctx.caller(request, user_name if isinstance(user_name, str) else None))
        if raw.get("chat_mode") is not None:
            raise InvalidRequestError(
                "is not taken here: the flow in the path runs (as chat_flow)", field="chat_mode"
            )
        request_from_body(dict(raw), request, ctx)  # the body as the chat request it is (chat_param too)
        sent = {**raw, "chat_mode": "chat_flow", "chat_param": uid}
        if sent.get("stream") is None:
            sent["stream"] = True  # a flow's run streams unless told not to
        req = request_from_body(sent, request, ctx)
        stream = bool(req.stream)
        owned_only = ctx.is_bound(request)
        if stream:
            turn = await ctx.engine.open_stream(req, owned_only=owned_only)
            shape = StreamShape(req)
            events = await started_events(request, turn, shape.chunk, shape.error)
            if events is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return SSEResponse(events, headers=conv_uid_header(turn.conv_uid))
        completion = await ctx.engine.chat(req, owned_only=owned_only)
        return JSONResponse(completion_json(completion), headers=conv_uid_header(completion.conv_uid))

    return router
