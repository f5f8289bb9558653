"""``/api/v2/serve/datasources``: the datasource registry, DB-GPT's shape.

::

    POST   /api/v2/serve/datasources                  create; data: the datasource
    PUT    /api/v2/serve/datasources                  update (id in the body)
    DELETE /api/v2/serve/datasources/{datasource_id}  data: the deleted datasource
    GET    /api/v2/serve/datasources/{datasource_id}
    GET    /api/v2/serve/datasources                  data: a list

``data`` is always the flat Datasource object with ``db_pwd`` masked as ``""``.
A key bound to a user lists and reaches only that user's datasources
(another's answer 404); an operator's key reaches all.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request

from convcore_server import ServerContext

from .datasources import DatasourceIn, DatasourceRegistry
from .envelope import EnvelopeRoute, ok

__all__ = ["build_datasources_router"]


def build_datasources_router(
    datasources: DatasourceRegistry, ctx: ServerContext, prefix: str = "/api/v2/serve"
) -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/datasources", route_class=EnvelopeRoute, tags=["datasources"])

    @router.post("", summary="Create a datasource")
    async def create_datasource(request: Request, body: DatasourceIn) -> dict[str, Any]:
        caller = ctx.caller(request, body.user_name, body.sys_code)
        return ok((await datasources.create(body, caller=caller)).public())

    @router.put("", summary="Update a datasource")
    async def update_datasource(request: Request, body: DatasourceIn) -> dict[str, Any]:
        caller = ctx.caller(request, body.user_name)
        return ok((await datasources.update(body, caller=caller)).public())

    @router.delete("/{datasource_id}", summary="Delete a datasource")
    async def delete_datasource(request: Request, datasource_id: int) -> dict[str, Any]:
        return ok((await datasources.delete(datasource_id, caller=ctx.caller(request))).public())

    @router.get("/{datasource_id}", summary="Get a datasource")
    async def get_datasource(request: Request, datasource_id: int) -> dict[str, Any]:
        return ok((await datasources.get(datasource_id, caller=ctx.caller(request))).public())

    @router.get("", summary="List datasources")
    async def list_datasources(
        request: Request, user_name: str | None = None, sys_code: str | None = None
    ) -> dict[str, Any]:
        caller = ctx.caller(request, user_name, sys_code)
        return ok([d.public() for d in await datasources.list(caller=caller)])

    return router
