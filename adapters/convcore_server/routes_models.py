"""``GET /api/v2/models``: the registry in OpenAI's list shape.

``client.models.list()`` of the OpenAI SDK reads it as is; each entry also
says its ``context_window`` and default ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from convcore import ModelSpec

from .context import ServerContext
from .errors import ModelNotFoundError
from .openapi_doc import error_responses

__all__ = ["build_models_router", "model_json"]


class ModelOut(BaseModel):
    """One model, in OpenAI's shape, with its window and default reply budget."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_window: int
    max_new_tokens: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]


def model_json(spec: ModelSpec, created: int) -> dict[str, Any]:
    return {
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": spec.owned_by,
        "context_window": spec.context_window,
        "max_new_tokens": spec.max_new_tokens,
    }


_RETRIEVE_FIRST = {"operationId": "retrieve_model", "parameters": {"model": "$response.body#/data/0/id"}}


def build_models_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/models",
        summary="List models",
        operation_id="list_models",
        response_model=None,
        responses={
            200: {"model": ModelList, "links": {"RetrieveModel": _RETRIEVE_FIRST}},
            **error_responses(401),
        },
    )
    async def list_models() -> dict[str, Any]:
        specs: list[ModelSpec] = list(ctx.engine.models)
        return {"object": "list", "data": [model_json(s, ctx.started_at) for s in specs]}

    @router.get(
        "/models/{model:path}",
        summary="Retrieve one model",
        operation_id="retrieve_model",
        response_model=None,
        responses={200: {"model": ModelOut}, **error_responses(401, 404)},
    )
    async def get_model(model: str) -> dict[str, Any]:
        if model not in ctx.engine.models:
            raise ModelNotFoundError(model, [spec.name for spec in ctx.engine.models])
        return model_json(ctx.engine.models.get(model), ctx.started_at)

    return router
