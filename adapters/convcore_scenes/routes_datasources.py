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

from convcore.schema import PRINTABLE_ID
from convcore_server import ServerContext
from convcore_server.body import read_json_object
from convcore_server.openapi_doc import EMPTY_TEXT, at_least_one, json_body

from .datasources import DB_TYPES, DatasourceIn, DatasourceRegistry, DatasourceView
from .envelope import EnvelopeRoute, answer, created, link, ok, scene_errors, schema_of
from .targets import HOST_MAX_LENGTH, HOST_PATTERN

__all__ = ["build_datasources_router"]


def datasource_schema(registry: DatasourceRegistry, *, update: bool) -> dict[str, Any]:
    """The body of a create (``update=False``) or an update, as ``registry``
    checks it: whether SQLite files may be named, whether passwords can be
    kept. Which directories hold them is checked per request, not stated:
    the document is public and must not show the server's file layout."""
    schema = schema_of(DatasourceIn)
    props = schema["properties"]
    servers = sorted(t for t in DB_TYPES if t != "sqlite")
    types = sorted(DB_TYPES) if registry.sqlite_roots != () else servers
    props["db_type"] = {"enum": types, "description": "The database kind (postgres means postgresql)"}
    props["db_name"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": 256,
        "pattern": PRINTABLE_ID,
        "description": "Unique: chat_data's chat_param",
    }
    host = {"type": "string", "maxLength": HOST_MAX_LENGTH, "pattern": HOST_PATTERN}
    sqlite_path = {"type": "string", "minLength": 1, "maxLength": 4096}
    props["db_host"] = {
        "anyOf": [host, EMPTY_TEXT, {"type": "null"}],
        "description": "A host name or IP address (server databases); checked again before each query. "
        "In an update, null or an empty string keeps the stored one",
    }
    sqlite_on = registry.sqlite_roots != ()
    props["db_path"] = {
        "anyOf": [*([sqlite_path] if sqlite_on else []), EMPTY_TEXT, {"type": "null"}],
        "description": "The SQLite file (sqlite), inside the directories the server allows "
        "(a file elsewhere is answered 400) and used by no other datasource (else 409). "
        "In an update, null or an empty string keeps the stored one",
    }
    if registry.secrets is None:
        props["db_pwd"] = {
            "anyOf": [EMPTY_TEXT, {"type": "null"}],
            "description": "This server keeps no passwords (it has no secret key)",
        }
    kinds: list[dict[str, Any]] = [
        {
            "properties": {"db_type": {"enum": servers}, "db_host": host},
            "required": ["db_type", "db_host"],
        }
    ]
    if "sqlite" in types:
        kinds.append(
            {
                "properties": {"db_type": {"const": "sqlite"}, "db_path": sqlite_path},
                "required": ["db_type", "db_path"],
            }
        )
    if update:
        props["id"] = {"type": "integer", "description": "The datasource to change"}
        props["db_type"] = {"anyOf": [props["db_type"], {"type": "null"}]}
        props["db_name"] = {"anyOf": [props["db_name"], {"type": "null"}]}
        kinds.append({"properties": {"db_type": {"type": "null"}}})
        schema["required"] = ["id"]
    else:
        schema["required"] = ["db_type", "db_name"]
    return {**schema, **at_least_one(*kinds)}


def build_datasources_router(
    datasources: DatasourceRegistry, ctx: ServerContext, prefix: str = "/api/v2/serve"
) -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/datasources", route_class=EnvelopeRoute, tags=["datasources"])
    one = f"{prefix}/datasources/{{datasource_id}}"
    by_id = {"datasource_id": "$response.body#/data/id"}
    uses = {
        "GetDatasource": link(one, "get", **by_id),
        "DeleteDatasource": link(one, "delete", **by_id),
        "UpdateDatasource": link(f"{prefix}/datasources", "put", body={"id": "$response.body#/data/id"}),
    }

    @router.post(
        "",
        summary="Create a datasource",
        responses={**scene_errors(409, 413), **created("datasource", uses, DatasourceView)},
        openapi_extra=json_body(datasource_schema(datasources, update=False)),
    )
    async def create_datasource(request: Request) -> dict[str, Any]:
        body = DatasourceIn.model_validate(await read_json_object(request))
        caller = ctx.caller(request, body.user_name, body.sys_code)
        return ok((await datasources.create(body, caller=caller)).public())

    @router.put(
        "",
        summary="Update a datasource",
        description='Changes the fields sent; `db_pwd` left out (or sent as `""`) keeps the stored one.',
        responses={**scene_errors(404, 409, 413), **answer(DatasourceView, "datasource")},
        openapi_extra=json_body(datasource_schema(datasources, update=True)),
    )
    async def update_datasource(request: Request) -> dict[str, Any]:
        body = DatasourceIn.model_validate(await read_json_object(request))
        caller = ctx.caller(request, body.user_name)
        return ok((await datasources.update(body, caller=caller)).public())

    @router.delete(
        "/{datasource_id:int}",
        summary="Delete a datasource",
        responses={**scene_errors(404), **answer(DatasourceView, "datasource")},
    )
    async def delete_datasource(request: Request, datasource_id: int) -> dict[str, Any]:
        return ok((await datasources.delete(datasource_id, caller=ctx.caller(request))).public())

    @router.get(
        "/{datasource_id:int}",
        summary="Get a datasource",
        responses={**scene_errors(404), **answer(DatasourceView, "datasource")},
    )
    async def get_datasource(request: Request, datasource_id: int) -> dict[str, Any]:
        return ok((await datasources.get(datasource_id, caller=ctx.caller(request))).public())

    @router.get(
        "",
        summary="List datasources",
        responses={**scene_errors(), **answer(list[DatasourceView], "datasources")},
    )
    async def list_datasources(
        request: Request, user_name: str | None = None, sys_code: str | None = None
    ) -> dict[str, Any]:
        caller = ctx.caller(request, user_name, sys_code)
        return ok([d.public() for d in await datasources.list(caller=caller)])

    return router
