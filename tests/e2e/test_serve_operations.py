"""``convcore serve`` as an operator runs it: metrics after real turns,
JSON log lines that carry each request's ids, keys kept out of the log."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.serve_process import ServeProcess


def test_metrics_logs_and_readiness_of_a_running_service(tmp_path: Path) -> None:
    service = ServeProcess(
        f"sqlite:///{tmp_path / 'ops.db'}",
        tmp_path,
        ("--log-format", "json", "--metrics-key", "scrape"),
        access_log=True,
    )
    with service, httpx.Client(base_url=service.base, headers=service.headers, timeout=30) as client:
        for i in range(10):
            r = client.post(
                "/api/v2/chat/completions",
                json={"messages": f"q{i}", "conv_uid": "ops", "span_id": f"span-{i}"},
                headers={"X-Request-Id": f"ops-req-{i}"},
            )
            assert r.status_code == 200 and r.headers["x-request-id"] == f"ops-req-{i}"
        client.get("/api/v2/models?api_key=leaked-secret")
        assert client.get("/metrics").status_code == 401  # an API key is not the metrics key
        text = httpx.get(f"{service.base}/metrics", headers={"Authorization": "Bearer scrape"}).text
        assert httpx.get(f"{service.base}/readyz").json()["status"] == "ok"
    turns = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "convcore_turns_total"
    }
    assert turns[(("chat_mode", "chat_normal"), ("outcome", "ok"))] >= 10
    assert "convcore_turn_duration_seconds_bucket" in text
    assert "convcore_store_duration_seconds_bucket" in text
    log = service.log_path.read_text()
    assert "leaked-secret" not in log
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    assert access, log[-2000:]
    chat = [e for e in access if "/api/v2/chat/completions" in e["message"]]
    assert {(e["request_id"], e["span_id"]) for e in chat} == {(f"ops-req-{i}", f"span-{i}") for i in range(10)}
