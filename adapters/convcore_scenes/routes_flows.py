"""``/api/v2/serve/awel/flows``: flows for chat_flow.

::

    POST   /api/v2/serve/awel/flows           create
    PUT    /api/v2/serve/awel/flows/{uid}     update the fields sent
    GET    /api/v2/serve/awel/flows/{uid}
    GET    /api/v2/serve/awel/flows           data.items (name, uid, page, page_size filters)
    DELETE /api/v2/serve/awel/flows/{uid}     answers the deleted flow
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .envelope import EnvelopeRoute, ok, page_of
from .flows import FlowIn, FlowRegistry

__all__ = ["build_flows_router"]


def build_flows_router(flows: FlowRegistry, prefix: str = "/api/v2/serve") -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/awel/flows", route_class=EnvelopeRoute, tags=["flows"])

    @router.post("", summary="Create a flow")
    async def create_flow(body: FlowIn) -> dict[str, Any]:
        return ok((await flows.create(body)).public())

    @router.put("/{uid}", summary="Update a flow")
    async def update_flow(uid: str, body: FlowIn) -> dict[str, Any]:
        return ok((await flows.update(uid, body)).public())

    @router.get("/{uid}", summary="Get a flow")
    async def get_flow(uid: str) -> dict[str, Any]:
        return ok((await flows.get(uid)).public())

    @router.get("", summary="List flows")
    async def list_flows(
        name: str | None = None, uid: str | None = None, page: int = 1, page_size: int = 20
    ) -> dict[str, Any]:
        found = [f.public() for f in await flows.list(name=name, uid=uid)]
        return ok(page_of(found, page, page_size))

    @router.delete("/{uid}", summary="Delete a flow")
    async def delete_flow(uid: str) -> dict[str, Any]:
        return ok((await flows.delete(uid)).public())

    return router
