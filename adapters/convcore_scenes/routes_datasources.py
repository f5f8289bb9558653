"""``/api/v2/serve/datasources``: the datasource registry, DB-GPT's shape.

::

    POST   /api/v2/serve/datasources                  create; data: the datasource
    PUT    /api/v2/serve/datasources                  update (id in the body)
    DELETE /api/v2/serve/datasources/{datasource_id}  data: the deleted datasource
    GET    /api/v2/serve/datasources/{datasource_id}
    GET    /api/v2/serve/datasources                  data: a list

``data`` is always the flat Datasource object with ``db_pwd`` masked as ``""``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .datasources import DatasourceIn, DatasourceRegistry
from .envelope import EnvelopeRoute, ok

__all__ = ["build_datasources_router"]


def build_datasources_router(datasources: DatasourceRegistry, prefix: str = "/api/v2/serve") -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/datasources", route_class=EnvelopeRoute, tags=["datasources"])

    @router.post("", summary="Create a datasource")
    async def create_datasource(body: DatasourceIn) -> dict[str, Any]:
        return ok((await datasources.create(body)).public())

    @router.put("", summary="Update a datasource")
    async def update_datasource(body: DatasourceIn) -> dict[str, Any]:
        return ok((await datasources.update(body)).public())

    @router.delete("/{datasource_id}", summary="Delete a datasource")
    async def delete_datasource(datasource_id: int) -> dict[str, Any]:
        return ok((await datasources.delete(datasource_id)).public())

    @router.get("/{datasource_id}", summary="Get a datasource")
    async def get_datasource(datasource_id: int) -> dict[str, Any]:
        return ok((await datasources.get(datasource_id)).public())

    @router.get("", summary="List datasources")
    async def list_datasources() -> dict[str, Any]:
        return ok([d.public() for d in await datasources.list()])

    return router
