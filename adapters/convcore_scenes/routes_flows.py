"""``/api/v2/serve/awel/flows``: flows for chat_flow.

::

    POST   /api/v2/serve/awel/flows           create
    PUT    /api/v2/serve/awel/flows/{uid}     update the fields sent
    GET    /api/v2/serve/awel/flows/{uid}
    GET    /api/v2/serve/awel/flows           data.items (name, uid, page, page_size filters)
    DELETE /api/v2/serve/awel/flows/{uid}     answers the deleted flow

A key bound to a user lists and reaches only that user's flows (another's
answer 404); an operator's key reaches all.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request

from convcore_server import ServerContext

from .envelope import EnvelopeRoute, ok, page_of
from .flows import FlowIn, FlowRegistry

__all__ = ["build_flows_router"]


def build_flows_router(flows: FlowRegistry, ctx: ServerContext, prefix: str = "/api/v2/serve") -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/awel/flows", route_class=EnvelopeRoute, tags=["flows"])

    @router.post("", summary="Create a flow")
    async def create_flow(request: Request, body: FlowIn) -> dict[str, Any]:
        caller = ctx.caller(request, body.user_name, body.sys_code)
        return ok((await flows.create(body, caller=caller)).public())

    @router.put("/{uid}", summary="Update a flow")
    async def update_flow(request: Request, uid: str, body: FlowIn) -> dict[str, Any]:
        caller = ctx.caller(request, body.user_name)
        return ok((await flows.update(uid, body, caller=caller)).public())

    @router.get("/{uid}", summary="Get a flow")
    async def get_flow(request: Request, uid: str) -> dict[str, Any]:
        return ok((await flows.get(uid, caller=ctx.caller(request))).public())

    @router.get("", summary="List flows")
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
        found = [f.public() for f in await flows.list(name=name, uid=uid, caller=caller)]
        return ok(page_of(found, page, page_size))

    @router.delete("/{uid}", summary="Delete a flow")
    async def delete_flow(request: Request, uid: str) -> dict[str, Any]:
        return ok((await flows.delete(uid, caller=ctx.caller(request))).public())

    return router
