"""OpenTelemetry spans for requests and the parts of a turn (the ``otel`` extra).

A request gets a server span; the engine's parts of the turn
(``convcore.prepare``, ``convcore.store.read``, ``convcore.generate``,
``convcore.store.append``) become its children, and what the engine tells
about the turn (chat_mode, model, outcome, tokens, the request's
``span_id``) and the ``X-Request-Id`` become attributes (``convcore.*``).

Spans go to whatever tracer provider the process has (set one up yourself,
or run under ``opentelemetry-instrument``); ``convcore serve --otel`` sets up
the SDK with an OTLP/HTTP exporter configured by the usual ``OTEL_*``
environment variables. Child spans are started with an explicit parent and
never made current, so a stream iterated across tasks cannot unbalance the
OpenTelemetry context.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from convcore.errors import MissingDependencyError

__all__ = ["OTelTracing", "install_sdk"]


class OTelTracing:
    """Starts the spans of one app on the global tracer provider."""

    def __init__(self, tracer: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:
            raise MissingDependencyError("tracing", "otel") from exc
        self._trace = trace
        self.tracer = tracer or trace.get_tracer("convcore_server")

    def start_request(self, name: str, attributes: Mapping[str, Any]) -> Any:
        return self.tracer.start_span(name, kind=self._trace.SpanKind.SERVER, attributes=dict(attributes))

    @contextmanager
    def child(self, parent: Any, name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
        context = self._trace.set_span_in_context(parent)
        span = self.tracer.start_span(name, context=context, attributes=_attrs(attributes))
        try:
            yield span
        except (GeneratorExit, asyncio.CancelledError):
            span.set_attribute("convcore.cancelled", True)  # the client left: not a failure
            raise
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def finish_request(self, span: Any, status: int, attributes: Mapping[str, Any]) -> None:
        span.set_attributes(_attrs(attributes))
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end()


def _attrs(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k if "." in k else f"convcore.{k}": v for k, v in attributes.items()}


def install_sdk() -> None:
    """The OpenTelemetry SDK with an OTLP/HTTP exporter, as the global provider
    (``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` and friends apply)."""
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise MissingDependencyError("convcore serve --otel", "otel") from exc
    name = os.environ.get("OTEL_SERVICE_NAME") or "convcore"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
