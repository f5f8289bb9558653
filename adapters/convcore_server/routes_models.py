"""``GET /api/v2/models``: the registry in OpenAI's list shape.

``client.models.list()`` of the OpenAI SDK reads it as is; each entry also
says its ``context_window`` and default ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from convcore import ModelSpec

from .context import ServerContext
from .errors import ModelNotFoundError
from .openapi_doc import error_responses

__all__ = ["build_models_router", "model_json"]


def model_json(spec: ModelSpec, created: int) -> dict[str, Any]:
    return {
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": spec.owned_by,
        "context_window": spec.context_window,
        "max_new_tokens": spec.max_new_tokens,
    }


def build_models_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/models",
        summary="List models",
        operation_id="list_models",
        responses={200: {"links": {"RetrieveModel": {
            "operationId": "retrieve_model", "parameters": {"model": "$response.body#/data/0/id"}
        }}}},
    )  # fmt: skip
    async def list_models() -> dict[str, Any]:
        specs: list[ModelSpec] = list(ctx.engine.models)
        return {"object": "list", "data": [model_json(s, ctx.started_at) for s in specs]}

    @router.get(
        "/models/{model:path}",
        summary="Retrieve one model",
        operation_id="retrieve_model",
        responses=error_responses(404),
    )
    async def get_model(model: str) -> dict[str, Any]:
        if model not in ctx.engine.models:
            raise ModelNotFoundError(model, [spec.name for spec in ctx.engine.models])
        return model_json(ctx.engine.models.get(model), ctx.started_at)

    return router
