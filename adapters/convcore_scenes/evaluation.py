"""Retriever evaluation: how well a knowledge space finds what a dataset expects.

Each dataset item is a ``query`` and what a good retrieval returns: the
``contexts`` (passages; a chunk is relevant if it holds one, or one holds
it, whitespace aside), and/or the ``doc_name`` / ``doc_id`` (one or a list:
a chunk of that document is relevant). The space is searched as
chat_knowledge searches it (the top ``top_k`` chunks), and two of DB-GPT's
metrics are computed per query, with their mean over the dataset:

- ``RetrieverHitRateMetric``: 1 if any of the top chunks is relevant, else 0
  (the mean is the hit rate);
- ``RetrieverMRRMetric``: 1 / rank of the first relevant chunk, 0 if none
  (the mean is the mean reciprocal rank).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from convcore.errors import InvalidRequestError
from convcore.owners import OPERATOR, Caller

from .base import WireModel
from .knowledge import Chunk, KnowledgeBase

__all__ = [
    "HIT_RATE",
    "METRICS",
    "MRR",
    "DatasetItem",
    "EvaluationResult",
    "EvaluationRun",
    "evaluate_retriever",
]

HIT_RATE = "RetrieverHitRateMetric"
MRR = "RetrieverMRRMetric"
METRICS = (HIT_RATE, MRR)
MAX_ITEMS = 1000
_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


class DatasetItem(WireModel):
    model_config = ConfigDict(extra="allow")

    query: str = Field(min_length=1, max_length=10_000)
    contexts: list[str] | None = None
    doc_name: str | list[str] | None = None
    doc_id: int | list[int] | None = None

    @field_validator("contexts", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def expects_something(self) -> bool:
        return bool(self.contexts or _as_list(self.doc_name) or _as_list(self.doc_id))

    def relevant(self, chunk: Chunk) -> bool:
        if chunk.doc_name in _as_list(self.doc_name) or chunk.doc_id in _as_list(self.doc_id):
            return True
        text = _norm(chunk.text)
        return any((c := _norm(ctx)) and (c in text or text in c) for ctx in self.contexts or ())


class EvaluationResult(BaseModel):
    """One metric's result for one query (DB-GPT's EvaluationResult)."""

    query: str
    prediction: list[str] = Field(description="The text of each chunk found, best first")
    contexts: list[str] = Field(description="The item's contexts, as sent")
    score: float
    passing: bool = Field(description="Whether the score is above 0")
    metric_name: str
    prediction_cost: int = Field(description="Milliseconds the search took")
    raw_dataset: dict[str, Any] = Field(description="The dataset item, as sent")
    feedback: None


@dataclass(frozen=True)
class EvaluationRun:
    """Per query, one result per metric (:class:`EvaluationResult`'s fields); and the means."""

    results: list[list[dict[str, Any]]]
    average: dict[str, float]


def _score(metric: str, relevant: Sequence[bool]) -> float:
    if metric == HIT_RATE:
        return 1.0 if any(relevant) else 0.0
    for rank, hit in enumerate(relevant, start=1):
        if hit:
            return 1.0 / rank
    return 0.0


async def evaluate_retriever(
    knowledge: KnowledgeBase,
    space_ref: int | str,
    dataset: Sequence[DatasetItem],
    metrics: Sequence[str] = METRICS,
    top_k: int = 5,
    *,
    caller: Caller = OPERATOR,
) -> EvaluationRun:
    space = await knowledge.get_space(space_ref, caller=caller)
    if not dataset:
        raise InvalidRequestError(
            "holds no items; send [{query, contexts or doc_name}, ...]", field="datasets"
        )
    if len(dataset) > MAX_ITEMS:
        raise InvalidRequestError(f"holds more than {MAX_ITEMS} items", field="datasets")
    for i, item in enumerate(dataset):
        if not item.expects_something():
            raise InvalidRequestError(
                "needs contexts, doc_name or doc_id: what a good retrieval returns", field=f"datasets.{i}"
            )
    results: list[list[dict[str, Any]]] = []
    totals = dict.fromkeys(metrics, 0.0)
    for item in dataset:
        started = time.perf_counter()
        hits = await knowledge.search(space, item.query, top_k)
        cost_ms = int((time.perf_counter() - started) * 1000)
        relevant = [item.relevant(h.chunk) for h in hits]
        prediction = [h.chunk.text for h in hits]
        row = []
        for metric in metrics:
            score = _score(metric, relevant)
            totals[metric] += score
            row.append(
                {
                    "query": item.query,
                    "prediction": prediction,
                    "contexts": item.contexts or [],
                    "score": score,
                    "passing": score > 0,
                    "metric_name": metric,
                    "prediction_cost": cost_ms,
                    "raw_dataset": item.model_dump(exclude_none=True),
                    "feedback": None,
                }
            )
        results.append(row)
    average = {m: totals[m] / len(dataset) for m in metrics}
    return EvaluationRun(results, average)
