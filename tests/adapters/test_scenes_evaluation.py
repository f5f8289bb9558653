"""POST /api/v2/serve/evaluate/evaluation: retriever evaluation of a knowledge
space on a dataset the request supplies, hit rate and MRR as DB-GPT defines them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.adapters.scenes_support import assert_envelope_error, client, harness

pytestmark = pytest.mark.anyio

EVAL = "/api/v2/serve/evaluate/evaluation"
SPACES = "/api/v2/serve/knowledge/spaces"
DOCS = "/api/v2/serve/knowledge/documents"

DOCUMENTS = {
    "hours": "The shop opens at nine in the morning and closes at six in the evening.",
    "returns": "Returns are accepted within thirty days when the receipt is shown.",
    "shipping": "Shipping to islands takes two extra days. Shipping costs five euros.",
}


async def _space(c: Any) -> int:
    sid: int = (await c.post(SPACES, json={"name": "shop"})).json()["data"]["id"]
    for name, text in DOCUMENTS.items():
        await c.post(DOCS, json={"space_id": sid, "doc_name": name, "content": text})
    return sid


def _request(space: object, datasets: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return {
        "scene_key": "recall",
        "scene_value": space,
        "context": {"top_k": 3},
        "evaluate_metrics": ["RetrieverHitRateMetric", "RetrieverMRRMetric"],
        "datasets": datasets,
        **more,
    }


async def test_hit_rate_and_mrr_per_query_and_on_average() -> None:
    h = harness()
    async with client(h.app) as c:
        sid = await _space(c)
        datasets = [
            # returns ranks first for this query: hit 1, reciprocal rank 1
            {"query": "when are returns accepted with a receipt", "doc_name": "returns"},
            # "shop" (asked twice) ranks the hours first, returns second: hit 1, RR 1/2
            {"query": "shop shop returns", "doc_name": "returns"},
            # found by its text rather than its name
            {"query": "islands extra days", "contexts": ["Shipping to islands takes two extra days."]},
            # nothing relevant retrieved: 0 and 0
            {"query": "opening hours of the shop", "doc_name": ["returns"]},
        ]
        r = await c.post(EVAL, json=_request(str(sid), datasets))
        assert r.status_code == 200, r.text
        body = r.json()
        rows = body["data"]
        scores = [[(m["metric_name"], m["score"]) for m in row] for row in rows]
        hr, mrr = "RetrieverHitRateMetric", "RetrieverMRRMetric"
        assert scores == [
            [(hr, 1.0), (mrr, 1.0)],
            [(hr, 1.0), (mrr, 0.5)],
            [(hr, 1.0), (mrr, 1.0)],
            [(hr, 0.0), (mrr, 0.0)],
        ]
        assert body["average_score"] == {hr: 0.75, mrr: 0.625}
        first = rows[0][0]
        assert first["query"] == datasets[0]["query"] and first["passing"] is True
        assert first["prediction"][0] == DOCUMENTS["returns"]
        assert first["raw_dataset"] == datasets[0]
        assert rows[3][0]["passing"] is False
        assert len(rows[1][0]["prediction"]) <= 3

        # By space name, one metric, default top_k (5).
        only = await c.post(
            EVAL,
            json={
                "scene_key": "recall",
                "scene_value": "shop",
                "evaluate_metrics": [mrr],
                "datasets": datasets[:1],
            },
        )
        assert [[m["metric_name"] for m in row] for row in only.json()["data"]] == [[mrr]]


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"scene_key": "app"}, 400, "scene_key"),
        ({"scene_value": None}, 400, "scene_value"),
        ({"scene_value": "no-such-space"}, 404, "no-such-space"),
        ({"datasets": None}, 400, "datasets"),
        ({"datasets": []}, 400, "datasets"),
        ({"datasets": [{"query": "x"}]}, 400, "datasets.0"),
        ({"datasets": [{"doc_name": "returns"}]}, 400, "datasets.0"),
        ({"evaluate_metrics": ["RetrieverSimilarityMetric"]}, 400, "RetrieverSimilarityMetric"),
        ({"context": {"top_k": 0}}, 400, "top_k"),
    ],
)
async def test_bad_evaluation_requests_say_what_is_wrong(
    change: dict[str, Any], status: int, field: str
) -> None:
    h = harness()
    async with client(h.app) as c:
        sid = await _space(c)
        body = _request(sid, [{"query": "returns", "doc_name": "returns"}]) | change
        r = await c.post(EVAL, json=body)
        assert field in assert_envelope_error(r, status)["err_msg"]
