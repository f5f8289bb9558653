"""Prometheus metrics of one app, in a registry of its own.

Each app has its own :class:`~prometheus_client.CollectorRegistry`, so
several apps in one process (tests, or apps mounted side by side) do not
collide. What each metric means is in the README's operations section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics", "pool_usage"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Turns span from a cached reply (milliseconds) to a long generation (minutes).
_TURN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

_M = TypeVar("_M", Counter, Gauge, Histogram)


class Metrics:
    """The service's counters, histograms and gauges."""

    def __init__(self, pools: Callable[[], Iterable[tuple[str, int, int]]] = lambda: ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.turns = Counter(
            "convcore_turns",
            "Chat turns answered, by outcome and chat mode",
            ["outcome", "chat_mode"],
            registry=r,
        )
        self.turn_seconds = Histogram(
            "convcore_turn_duration_seconds",
            "Time from a chat request's arrival to its last byte",
            ["chat_mode", "stream"],
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "convcore_time_to_first_token_seconds",
            "Time from a streamed chat request's arrival to the model's first text",
            ["chat_mode"],
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "convcore_generation_duration_seconds",
            "Time the model backend took to generate a reply",
            ["model"],
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "convcore_store_duration_seconds",
            "Time one store operation of a turn took",
            ["operation"],
            buckets=_STORE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "convcore_tokens",
            "Tokens of stored turns: in (prompt) and out (reply)",
            ["direction"],
            registry=r,
        )
        self.errors = Counter(
            "convcore_errors",
            "Error answers (responses and stream error chunks), by err_code",
            ["code"],
            registry=r,
        )
        self.open_streams = Gauge("convcore_open_streams", "Event streams being sent now", registry=r)
        r.register(_PoolCollector(pools))
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, looked up once: ``labels`` checks the
        values and takes a lock on every call, and a turn records seven. The
        service never removes a label set, so the child stays the one the
        registry renders."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    """Connection pool use, read at scrape time."""

    def __init__(self, pools: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        in_use = GaugeMetricFamily(
            "convcore_pool_connections_in_use", "Store connections checked out now", labels=["pool"]
        )
        size = GaugeMetricFamily(
            "convcore_pool_connections_max", "Store connections the pool may open", labels=["pool"]
        )
        for name, used, limit in self.pools():
            in_use.add_metric([name], used)
            size.add_metric([name], limit)
        yield in_use
        yield size

    def describe(self) -> Iterator[Metric]:
        return iter(())


def pool_usage(*stores: Any) -> Iterator[tuple[str, int, int]]:
    """(pool, in use, maximum) for each store whose driver pool we can read:
    SQLAlchemy's QueuePool and redis-py's pools; other stores report none."""
    for store in stores:
        kind = type(store).__name__
        engine = getattr(store, "engine", None)
        pool = getattr(getattr(engine, "sync_engine", engine), "pool", None)
        if pool is not None and hasattr(pool, "checkedout"):
            limit = pool.size() + max(getattr(pool, "_max_overflow", 0), 0)
            yield kind, int(pool.checkedout()), int(limit)
            continue
        client = getattr(store, "client", None)
        redis_pool = getattr(client, "connection_pool", None)
        if redis_pool is not None and hasattr(redis_pool, "max_connections"):
            used = len(getattr(redis_pool, "_in_use_connections", ()))
            yield kind, int(used), int(redis_pool.max_connections)
