"""Redis storage for convcore: a single server or a Redis Cluster.

``RedisStore(client)`` uses a redis-py asyncio client you own;
``RedisStore.from_url("redis://…" | "redis+cluster://…")`` makes and owns one.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from convcore.errors import MissingDependencyError

    raise MissingDependencyError("the Redis store", "redis") from exc

from .store import RedisStore

__all__ = ["RedisStore"]
