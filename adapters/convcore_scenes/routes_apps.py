"""``/api/v2/serve/apps``: apps for chat_app.

::

    GET    /api/v2/serve/apps                 list: data.app_list (page, page_size)
    GET    /api/v2/serve/apps/{app_code}
    POST   /api/v2/serve/apps                 create (app_code optional: one is made)
    PUT    /api/v2/serve/apps/{app_code}      update the fields sent
    PUT    /api/v2/serve/apps                 update, app_code in the body
    DELETE /api/v2/serve/apps/{app_code}      answers the deleted app

A key bound to a user lists and reaches only that user's apps (another's
answer 404); an operator's key reaches all, ``user_name`` / ``sys_code``
query parameters narrowing its list.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.requests import Request

from convcore.errors import InvalidRequestError
from convcore_server import ServerContext

from .apps import App, AppChange, AppCreate, AppRegistry, AppUpdate
from .envelope import EnvelopeRoute, answer, created, link, ok, page_of, scene_errors

__all__ = ["AppPage", "build_apps_router"]


class AppPage(BaseModel):
    """DB-GPT's list of apps: one page and the totals (page_of's, under the names its client reads)."""

    app_list: list[App] = Field(description="The apps of this page")
    total_count: int = Field(description="How many apps there are in all")
    total_page: int
    current_page: int = Field(description="This page's number, from 1")
    page_size: int


def build_apps_router(apps: AppRegistry, ctx: ServerContext, prefix: str = "/api/v2/serve") -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/apps", route_class=EnvelopeRoute, tags=["apps"])
    one = f"{prefix}/apps/{{app_code}}"
    by_code = {"app_code": "$response.body#/data/app_code"}
    uses = {
        "GetApp": link(one, "get", **by_code),
        "UpdateApp": link(one, "put", **by_code),
        "DeleteApp": link(one, "delete", **by_code),
        "UpdateAppByBody": link(f"{prefix}/apps", "put", body=by_code),
    }

    @router.get("", summary="List apps", responses={**scene_errors(), **answer(AppPage, "page of apps")})
    async def list_apps(
        request: Request,
        page: int = 1,
        page_size: int = 20,
        user_name: str | None = None,
        sys_code: str | None = None,
    ) -> dict[str, Any]:
        caller = ctx.caller(request, user_name, sys_code)
        found = page_of(await apps.list(limit=1_000_000, caller=caller), page, page_size)
        return ok(
            {
                "app_list": [a.model_dump() for a in found["items"]],
                "total_count": found["total_count"],
                "total_page": found["total_pages"],
                "current_page": found["page"],
                "page_size": found["page_size"],
            }
        )

    @router.get("/{app_code}", summary="Get an app", responses={**scene_errors(404), **answer(App, "app")})
    async def get_app(request: Request, app_code: str) -> dict[str, Any]:
        return ok((await apps.get(app_code, caller=ctx.caller(request))).model_dump())

    @router.post(
        "", summary="Create an app", responses={**scene_errors(409, 413), **created("app", uses, App)}
    )
    async def create_app(request: Request, body: AppCreate) -> dict[str, Any]:
        caller = ctx.caller(request, body.user_name, body.sys_code)
        return ok((await apps.create(body, caller=caller)).model_dump())

    @router.put(
        "/{app_code}",
        summary="Update an app",
        description="Changes the fields sent. An `app_code` in the body must be the path's.",
        responses={**scene_errors(404, 413), **answer(App, "app")},
    )
    async def update_app(request: Request, app_code: str, body: AppChange) -> dict[str, Any]:
        sent = await request.json()
        if isinstance(sent, dict) and sent.get("app_code") not in (None, app_code):
            raise InvalidRequestError("cannot be changed", field="app_code")
        caller = ctx.caller(request, body.user_name)
        return ok((await apps.update(app_code, body, caller=caller)).model_dump())

    @router.put(
        "",
        summary="Update an app (app_code in the body)",
        responses={**scene_errors(404, 413), **answer(App, "app")},
    )
    async def update_app_body(request: Request, body: AppUpdate) -> dict[str, Any]:
        caller = ctx.caller(request, body.user_name)
        return ok((await apps.update(body.app_code, body, caller=caller)).model_dump())

    @router.delete(
        "/{app_code}", summary="Delete an app", responses={**scene_errors(404), **answer(App, "app")}
    )
    async def delete_app(request: Request, app_code: str) -> dict[str, Any]:
        return ok((await apps.delete(app_code, caller=ctx.caller(request))).model_dump())

    return router
