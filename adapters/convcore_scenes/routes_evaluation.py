"""``POST /api/v2/serve/evaluate/evaluation``: DB-GPT's evaluation request.

Retriever evaluation (``scene_key: "recall"``) over the knowledge space
named by ``scene_value`` (its id or name), on the dataset the request
supplies (``datasets``), with ``evaluate_metrics`` from
``RetrieverHitRateMetric`` and ``RetrieverMRRMetric`` (both by default) and
``context.top_k`` chunks per query (default 5). ``data`` is a list per
query of one result per metric, as DB-GPT answers; ``average_score`` beside
it holds each metric's mean (hit rate, MRR). A key bound to a user
evaluates only that user's spaces. See :mod:`.evaluation`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import ConfigDict, Field
from starlette.requests import Request

from convcore.errors import InvalidRequestError
from convcore_server import ServerContext
from convcore_server.body import read_json_object
from convcore_server.openapi_doc import Envelope, at_least_one, json_body

from .base import WireModel
from .envelope import EnvelopeRoute, ok, scene_errors, schema_of
from .evaluation import MAX_ITEMS, METRICS, DatasetItem, EvaluationResult, evaluate_retriever
from .knowledge import KnowledgeBase

__all__ = ["EvaluateIn", "Evaluation", "build_evaluation_router"]


class Evaluation(Envelope[list[list[EvaluationResult]]]):
    """DB-GPT's envelope, its data a list per query of one result per metric,
    and beside it each metric's mean."""

    average_score: dict[str, float] = Field(description="Each metric's mean over the dataset, by its name")


_RECALL = ("recall", "retriever")


class EvaluateIn(WireModel):
    model_config = ConfigDict(extra="ignore")

    scene_key: str | None = None
    scene_value: str | int | None = None
    datasets_name: str | None = None
    datasets: list[DatasetItem] | None = None
    evaluate_metrics: list[str] | None = None
    context: dict[str, Any] | None = None
    user_name: str | None = None
    sys_code: str | None = None


class _Context(WireModel):
    model_config = ConfigDict(extra="ignore")

    top_k: int = Field(default=5, ge=1, le=100)


def _dataset_item_schema() -> dict[str, Any]:
    """An item names what a good retrieval returns: contexts, doc_name or doc_id."""
    item = schema_of(DatasetItem)
    some = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1}]}
    given = [{"required": [k], "properties": {k: some}} for k in ("contexts", "doc_name", "doc_id")]
    return {**item, **at_least_one(*given)}


def evaluate_schema() -> dict[str, Any]:
    schema = schema_of(EvaluateIn)
    props = schema["properties"]
    props["scene_key"] = {
        "type": "string",
        "enum": list(_RECALL),
        "description": "recall: retriever evaluation",
    }
    props["scene_value"] = {
        "anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}],
        "description": "The knowledge space (its id or name)",
    }
    props["datasets"] = {
        "type": "array",
        "items": _dataset_item_schema(),
        "minItems": 1,
        "maxItems": MAX_ITEMS,
    }
    props["evaluate_metrics"] = {
        "anyOf": [{"type": "array", "items": {"type": "string", "enum": list(METRICS)}}, {"type": "null"}],
        "description": "Default: all of them",
    }
    props["context"] = {"anyOf": [schema_of(_Context), {"type": "null"}]}
    return {**schema, "required": ["scene_key", "scene_value", "datasets"]}


def build_evaluation_router(
    knowledge: KnowledgeBase, ctx: ServerContext, prefix: str = "/api/v2/serve"
) -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/evaluate", route_class=EnvelopeRoute, tags=["evaluation"])

    @router.post(
        "/evaluation",
        summary="Evaluate a knowledge space's retrieval (hit rate, MRR)",
        responses={
            **scene_errors(404, 413),
            200: {"model": Evaluation, "description": "The results, in the envelope's data, and their means"},
        },
        openapi_extra=json_body(evaluate_schema()),
    )
    async def evaluation(request: Request) -> dict[str, Any]:
        body = EvaluateIn.model_validate(await read_json_object(request))
        caller = ctx.caller(request, body.user_name, body.sys_code)
        if body.scene_key not in _RECALL:
            raise InvalidRequestError(
                f"is {body.scene_key!r}; only retriever evaluation ('recall') is offered", field="scene_key"
            )
        if body.scene_value in (None, ""):
            raise InvalidRequestError("names the knowledge space (its id or name)", field="scene_value")
        if body.datasets is None:
            raise InvalidRequestError(
                "is required: [{query, contexts or doc_name}, ...] (stored datasets are not kept)",
                field="datasets",
            )
        metrics = body.evaluate_metrics or list(METRICS)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise InvalidRequestError(
                f"{unknown[0]!r} is not offered; choose from {', '.join(METRICS)}", field="evaluate_metrics"
            )
        context = _Context.model_validate(body.context or {})
        ref = body.scene_value
        run = await evaluate_retriever(
            knowledge, ref, body.datasets, list(dict.fromkeys(metrics)), context.top_k, caller=caller
        )
        return {**ok(run.results), "average_score": run.average}

    return router
