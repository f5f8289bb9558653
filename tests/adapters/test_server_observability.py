"""Health, readiness, metrics, request ids in logs, OpenTelemetry spans, and
what the service keeps out of its logs and docs."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from convcore import DEFAULT_MODEL, Engine, MemoryStore, StorageUnavailableError, default_registry
from convcore_server import create_app
from convcore_server.logs import JSONFormatter, RedactQueryFilter, RequestContextFilter
from convcore_server.observability import Observability
from tests.adapters.server_support import CHAT, KEYS, client_for, make_app

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_ten_turns_count_them_and_time_them() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        for i in range(8):
            assert (await c.post(CHAT, json={"messages": f"q{i}", "conv_uid": "m"})).status_code == 200
        for i in range(2):
            r = await c.post(CHAT, json={"messages": f"s{i}", "conv_uid": "m", "stream": True})
            assert "[DONE]" in r.text
        await c.post(CHAT, json={"messages": "x", "model": "nope"})  # one error
        for i in range(3):  # made-up modes must not become label values
            await c.post(CHAT, json={"messages": "x", "chat_mode": f"made-up-{i}"})
        text = (await c.get("/metrics")).text
    assert "made-up" not in text
    assert value(text, "convcore_turns_total", outcome="unsupported_chat_mode", chat_mode="unknown") == 3
    assert value(text, "convcore_turns_total", outcome="ok", chat_mode="chat_normal") == 10
    assert value(text, "convcore_turns_total", outcome="model_not_found", chat_mode="chat_normal") == 1
    assert value(text, "convcore_errors_total", code="model_not_found") == 1
    assert value(text, "convcore_turn_duration_seconds_count", chat_mode="chat_normal", stream="false") == 9
    assert value(text, "convcore_turn_duration_seconds_count", chat_mode="chat_normal", stream="true") == 2
    assert value(text, "convcore_time_to_first_token_seconds_count", chat_mode="chat_normal") == 2
    assert value(text, "convcore_store_duration_seconds_count", operation="append") == 10
    assert value(text, "convcore_store_duration_seconds_count", operation="read") == 10
    assert value(text, "convcore_generation_duration_seconds_count", model=DEFAULT_MODEL) == 10
    assert value(text, "convcore_tokens_total", direction="in") > 0
    assert value(text, "convcore_tokens_total", direction="out") > 0
    assert value(text, "convcore_open_streams") == 0
    assert 'convcore_turn_duration_seconds_bucket{chat_mode="chat_normal",le="0.01",stream="false"}' in text


async def test_an_open_stream_is_counted_while_it_runs() -> None:
    import anyio

    from tests.adapters.server_support import GateBackend, registry_with

    gate = GateBackend()
    app, _, _ = make_app(registry_with("g", gate))
    metrics = app.state.metrics
    body = json.dumps({"messages": "x", "model": "g", "stream": True}).encode()
    gone = anyio.Event()
    seen: list[float] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if b'"content":"Hello"' in message.get("body", b""):
            seen.append(metrics.open_streams._value.get())
            gone.set()

    with anyio.fail_after(5):
        await app(chat_scope(), receive, send)
    assert seen == [1] and metrics.open_streams._value.get() == 0
    text = metrics.render().decode()
    assert value(text, "convcore_turns_total", outcome="abandoned", chat_mode="chat_normal") == 1


class _SilentBackend:
    """Never says a first word."""

    async def complete(self, request: Any) -> Any:
        raise AssertionError("streams only")

    async def stream(self, request: Any) -> Any:
        import anyio

        await anyio.sleep_forever()
        yield  # pragma: no cover

    async def aclose(self) -> None:
        return None


async def test_a_client_that_leaves_before_the_first_token_is_abandoned_and_logged_499(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import anyio

    from tests.adapters.server_support import registry_with

    app, _, _ = make_app(registry_with("silent", _SilentBackend()))
    body = json.dumps({"messages": "x", "model": "silent", "stream": True}).encode()
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5), caplog.at_level(logging.INFO, logger="uvicorn.access"):
        await app(chat_scope(), receive, send)
    assert sent[0]["status"] == 499
    # uvicorn writes no access line for a closed connection: the service does.
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert lines == [f'127.0.0.1:1 - "POST {CHAT} HTTP/1.1" 499']
    text = app.state.metrics.render().decode()
    assert value(text, "convcore_turns_total", outcome="abandoned", chat_mode="chat_normal") == 1
    assert "http_499" not in text


def chat_scope() -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"authorization", f"Bearer {KEYS[0]}".encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }  # fmt: skip


async def test_metrics_can_be_turned_off() -> None:
    app, _, _ = make_app(observability=Observability(metrics=False))
    async with client_for(app) as c:
        assert (await c.get("/metrics")).status_code == 404


async def test_metrics_take_an_operator_key_or_their_own_key_only() -> None:
    app, _, _ = make_app(user_keys={"tenant-key": "ada"})
    async with client_for(app, key=None) as c:
        assert (await c.get("/metrics")).status_code == 401
    async with client_for(app, key="tenant-key") as c:
        assert (await c.get("/metrics")).status_code == 401
    async with client_for(app) as c:
        assert (await c.get("/metrics")).status_code == 200
    app, _, _ = make_app(observability=Observability(metrics_key="scrape-key"))
    async with client_for(app, key="scrape-key") as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.post(CHAT, json={"messages": "x"})).status_code == 401  # only for /metrics
    async with client_for(app) as c:
        assert (await c.get("/metrics")).status_code == 401


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_pool_use_is_reported(tmp_path: Any, kind: str) -> None:
    from convcore import open_store
    from tests.stores.redis import REDIS_URL, require_redis

    if kind == "redis":
        await require_redis()
        url = f"{REDIS_URL}?prefix=cctest:pool-metrics:{tmp_path.name}"
    else:
        url = f"sqlite:///{tmp_path / 'p.db'}"
    store = open_store(url)
    app = create_app(Engine(store, default_registry()), api_keys=KEYS)
    try:
        async with client_for(app) as c:
            await c.post(CHAT, json={"messages": "x", "conv_uid": f"pool-{tmp_path.name}"})
            text = (await c.get("/metrics")).text
            if kind == "redis":
                await store.delete_conversation(f"pool-{tmp_path.name}")
    finally:
        await store.aclose()
    pools = {
        s.labels["pool"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "convcore_pool_connections_max"
    }
    assert pools and all(v > 0 for v in pools.values()), text[-600:]
    assert "convcore_pool_connections_in_use{" in text


class FlakyStore(MemoryStore):
    down = False

    async def get_conversation(self, conv_uid: str) -> Any:
        if self.down:
            raise StorageUnavailableError("connection refused")
        return await super().get_conversation(conv_uid)


async def test_readiness_follows_the_store_and_liveness_does_not() -> None:
    store = FlakyStore()
    app = create_app(Engine(store, default_registry()), api_keys=KEYS)
    async with client_for(app, key=None) as c:
        assert (await c.get("/readyz")).status_code == 200
        store.down = True
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["store"]["error"] == "connection refused"
        assert (await c.get("/healthz")).status_code == 200
        store.down = False
        assert (await c.get("/readyz")).status_code == 200


async def test_readiness_fails_when_the_sqlite_file_is_gone_replaced_or_read_only(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read alone still answers then: from pooled connections, which go on
    writing turns into a deleted file."""
    import os

    from convcore import open_store

    db = tmp_path / "s.db"
    store = open_store(f"sqlite:///{db}")
    app = create_app(Engine(store, default_registry()), api_keys=KEYS)
    try:
        async with client_for(app, key=None) as c:
            assert (await c.get("/readyz")).status_code == 200
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real_access(path, mode))
            r = await c.get("/readyz")
            assert r.status_code == 503 and "cannot be written" in r.json()["checks"]["store"]["error"]
            monkeypatch.setattr(os, "access", real_access)
            assert (await c.get("/readyz")).status_code == 200
            moved = tmp_path / "moved.db"
            db.rename(moved)
            r = await c.get("/readyz")
            assert r.status_code == 503 and "is gone" in r.json()["checks"]["store"]["error"]
            db.write_bytes(moved.read_bytes())  # another file at the same path
            r = await c.get("/readyz")
            assert r.status_code == 503 and "was replaced" in r.json()["checks"]["store"]["error"]
    finally:
        await store.aclose()


async def test_readiness_asks_each_backend_that_can_be_asked_within_the_timeout() -> None:
    import asyncio

    from convcore import LocalBackend, ModelRegistry, ModelSpec

    class Hanging(LocalBackend):
        async def ping(self) -> None:
            await asyncio.sleep(30)

    models = ModelRegistry(
        [
            ModelSpec(name="slow", backend=Hanging(), context_window=4096),
            ModelSpec(name="local", backend=LocalBackend(), context_window=4096),
        ]
    )
    app = create_app(
        Engine(MemoryStore(), models), api_keys=KEYS, observability=Observability(ready_timeout=0.2)
    )
    async with client_for(app, key=None) as c:
        r = await c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["backend:slow"] == {"ok": False, "seconds": pytest.approx(0.2, abs=0.5), "error": "no answer in 0.2 s"}
    assert r.json()["checks"]["store"]["ok"] is True


async def test_every_log_line_of_a_request_carries_its_request_id_and_span_id(caplog: pytest.LogCaptureFixture) -> None:
    app, engine, _ = make_app()

    class Boom(MemoryStore):
        async def append_turn(self, turn: Any) -> Any:
            logging.getLogger("convcore_redis").warning("driver says hello")
            raise StorageUnavailableError("gone")

    engine.store = Boom()
    handler_filter = RequestContextFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO):
            async with client_for(app) as c:
                r = await c.post(
                    CHAT, json={"messages": "x", "span_id": "span-42"}, headers={"X-Request-Id": "req-1"}
                )
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert r.status_code == 503 and r.headers["x-request-id"] == "req-1"
    mine = [rec for rec in caplog.records if rec.name.startswith("convcore")]
    assert len(mine) >= 2
    assert {(rec.request_id, rec.span_id) for rec in mine} == {("req-1", "span-42")}  # type: ignore[attr-defined]


async def test_a_missing_or_unsafe_request_id_is_replaced_by_a_fresh_one() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        one = (await c.get("/api/v2/models")).headers["x-request-id"]
        two = (await c.get("/api/v2/models", headers={"X-Request-Id": "bad id\twith tab"})).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", one) and re.fullmatch(r"[0-9a-f]{32}", two) and one != two


def test_json_log_lines_are_one_object_each_with_the_ids() -> None:
    record = logging.LogRecord("convcore_server", logging.ERROR, __file__, 1, "failed: %s", ("x",), None)
    record.request_id, record.span_id = "req-9", "span-9"
    line = JSONFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "failed: x" and entry["request_id"] == "req-9" and entry["span_id"] == "span-9"
    assert entry["level"] == "error" and entry["time"].endswith("Z")


def test_keys_in_a_query_string_do_not_reach_the_access_log() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/api/v2/models?api_key=sk-secret&limit=5&token=t0k", "1.1", 401), None,
    )  # fmt: skip
    RedactQueryFilter().filter(record)
    message = record.getMessage()
    assert "sk-secret" not in message and "t0k" not in message
    assert "api_key=***" in message and "limit=5" in message


@pytest.mark.parametrize("name", ["apikey", "apiKey", "X-Api-Key", "bearer", "pwd", "session", "access_token"])
def test_every_spelling_of_a_key_is_masked_in_the_access_log(name: str) -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", f"/api/v2/conversations/x?{name}=S3CRET&limit=5", "1.1", 200), None,
    )  # fmt: skip
    RedactQueryFilter().filter(record)
    message = record.getMessage()
    assert "S3CRET" not in message and "limit=5" in message


def test_user_text_in_a_query_string_does_not_reach_the_access_log() -> None:
    long_name = "n" * 500
    path = f"/api/v2/serve/knowledge/documents?doc_name={long_name}&content=my+private+notes&doc_type=TEXT"
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "POST", path, "1.1", 200), None,
    )  # fmt: skip
    RedactQueryFilter().filter(record)
    message = record.getMessage()
    assert "private" not in message and "content=***" in message and "doc_type=TEXT" in message
    assert "n" * 101 not in message and "n" * 100 + "***" in message


async def test_spans_of_a_turn_are_children_of_the_request_span_with_its_ids() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app, _, _ = make_app(observability=Observability(tracing=True, tracer=provider.get_tracer("t")))
    async with client_for(app) as c:
        r = await c.post(
            CHAT, json={"messages": "x", "conv_uid": "t", "span_id": "span-1"}, headers={"X-Request-Id": "req-t"}
        )
    assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["POST /api/v2/chat/completions"]
    for name in ("convcore.prepare", "convcore.store.read", "convcore.generate", "convcore.store.append"):
        assert spans[name].parent is not None and spans[name].parent.span_id == request.context.span_id, name
    assert request.attributes["convcore.request_id"] == "req-t"
    assert request.attributes["convcore.span_id"] == "span-1"
    assert request.attributes["convcore.outcome"] == "ok"
    assert request.attributes["convcore.chat_mode"] == "chat_normal"
    assert request.attributes["http.response.status_code"] == 200


async def test_docs_can_require_a_key_or_be_off() -> None:
    app, _, _ = make_app()
    async with client_for(app, key=None) as c:
        assert (await c.get("/openapi.json")).status_code == 200  # public stays the default
    app, _, _ = make_app(docs="keyed")
    async with client_for(app, key=None) as c:
        assert (await c.get("/openapi.json")).status_code == 401
        assert (await c.get("/docs")).status_code == 401
    async with client_for(app) as c:
        assert "/api/v2/chat/completions" in (await c.get("/openapi.json")).json()["paths"]
        assert (await c.get("/docs")).status_code == 200
    app, _, _ = make_app(docs="off")
    async with client_for(app) as c:
        assert (await c.get("/openapi.json")).status_code == 404
        assert (await c.get("/docs")).status_code == 404


async def test_a_dropped_upload_is_one_quiet_log_line(caplog: pytest.LogCaptureFixture) -> None:
    app, _, store = make_app()
    sent: list[dict[str, Any]] = []
    body = json.dumps({"messages": "x"}).encode()

    async def receive() -> dict[str, Any]:
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": body[:5], "more_body": True}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    with caplog.at_level(logging.DEBUG):
        await app(chat_scope(), receive, send)
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "uvicorn.access"]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
    assert "went away" in lines[0].getMessage()
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert access == [f'127.0.0.1:1 - "POST {CHAT} HTTP/1.1" 499']
    assert not await store.list_conversations()
    text = app.state.metrics.render().decode()
    assert value(text, "convcore_turns_total", outcome="abandoned", chat_mode="unknown") == 1


def test_a_span_that_fails_is_timed_traced_as_an_error_and_raised() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from convcore_server.logs import RequestContext
    from convcore_server.metrics import Metrics
    from convcore_server.observability import RequestObserver
    from convcore_server.tracing import OTelTracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = OTelTracing(provider.get_tracer("t"))
    metrics = Metrics()
    observer = RequestObserver(RequestContext("req-f"), metrics, tracing)
    observer.request_span = tracing.start_request("POST x", {})
    with pytest.raises(StorageUnavailableError), observer.start_span("convcore.store.read", {}):
        raise StorageUnavailableError("down")
    with observer.start_span("convcore.generate", {"model": "asked"}) as generating:
        generating.set_attribute("model", "answered")  # what the span learnt wins, as a label too
    with observer.start_span("convcore.store.read", {}):
        pass
    text = metrics.render().decode()
    assert value(text, "convcore_store_duration_seconds_count", operation="read") == 2
    assert value(text, "convcore_generation_duration_seconds_count", model="answered") == 1
    assert value(text, "convcore_generation_duration_seconds_count", model="asked") == 0
    failed, generated, read = exporter.get_finished_spans()
    assert failed.status.status_code == StatusCode.ERROR and failed.events[0].name == "exception"
    assert generated.attributes is not None and generated.attributes["convcore.model"] == "answered"
    assert read.status.status_code == StatusCode.UNSET


def test_a_labelled_metric_child_is_the_one_the_registry_renders() -> None:
    from convcore_server.metrics import Metrics

    metrics = Metrics()
    child = metrics.child(metrics.turns, "ok", "chat_normal")
    assert (
        child
        is metrics.child(metrics.turns, "ok", "chat_normal")
        is metrics.turns.labels("ok", "chat_normal")
    )
    child.inc()
    metrics.child(metrics.turns, "ok", "chat_normal").inc()
    text = metrics.render().decode()
    assert value(text, "convcore_turns_total", outcome="ok", chat_mode="chat_normal") == 2


def test_a_minted_request_id_is_a_random_uuid4_in_hex() -> None:
    import uuid

    from convcore_server.logs import request_id_from

    ids = {request_id_from(None) for _ in range(200)}
    assert len(ids) == 200
    for minted in ids:
        parsed = uuid.UUID(hex=minted)
        assert parsed.hex == minted and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert request_id_from("req-1") == "req-1"
