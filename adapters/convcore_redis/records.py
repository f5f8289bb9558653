"""Records (apps, datasources, knowledge, flows) in Redis.

``RedisRecordStore(client, prefix="convcore")`` or
``RedisRecordStore.from_url("redis://…")``. Each kind has two keys sharing
one hash tag (the SHA-1 of the kind), so they sit in one Cluster slot and
every write is one MULTI/EXEC transaction::

    <prefix>:rec:{<sha1(kind)>}:h   hash   key -> record JSON
    <prefix>:rec:{<sha1(kind)>}:z   zset   key, score 0 (ordered by bytes = code points)

``create_only`` is HSETNX inside the transaction; a delete reads, removes
and unindexes in one transaction, so exactly one of two racing deletes gets
the record.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from redis import exceptions as redis_exc
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from convcore.errors import ConflictError, StorageError, StorageUnavailableError

__all__ = ["RedisRecordStore"]

Record = dict[str, Any]
Client = Redis | RedisCluster


class RedisRecordStore:
    """Records in Redis (a single server or a Cluster).

    A client passed in is not closed by :meth:`aclose`; one made by
    :meth:`from_url` is. The prefix must not contain braces.
    """

    def __init__(self, client: Client, *, prefix: str = "convcore", owned: bool = False) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix must be non-empty and brace-free, got {prefix!r}")
        self.client = client
        self.prefix = prefix
        self._owned = owned

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "convcore", cluster: bool = False) -> RedisRecordStore:
        """A store on its own client; ``cluster=True`` for a Redis Cluster."""
        client: Client = (
            RedisCluster.from_url(url, decode_responses=True)
            if cluster
            else Redis.from_url(url, decode_responses=True)
        )
        return cls(client, prefix=prefix, owned=True)

    def keys(self, kind: str) -> tuple[str, str]:
        """The hash and the ordering zset of ``kind``."""
        tag = hashlib.sha1(kind.encode("utf-8", "surrogatepass")).hexdigest()
        base = f"{self.prefix}:rec:{{{tag}}}"
        return f"{base}:h", f"{base}:z"

    async def put(self, kind: str, key: str, value: Record, *, create_only: bool = False) -> None:
        h, z = self.keys(kind)
        data = json.dumps(value, ensure_ascii=False)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                if create_only:
                    pipe.hsetnx(h, key, data)
                else:
                    pipe.hset(h, key, data)
                pipe.zadd(z, {key: 0})
                created, _ = await pipe.execute()
        except (redis_exc.RedisError, OSError) as exc:
            raise _storage_error(exc) from exc
        if create_only and not created:
            raise ConflictError(f"{kind} {key!r} already exists")

    async def get(self, kind: str, key: str) -> Record | None:
        h, _ = self.keys(kind)
        try:
            found = await self.client.hget(h, key)
        except (redis_exc.RedisError, OSError) as exc:
            raise _storage_error(exc) from exc
        return _load(found)

    async def list(self, kind: str, *, limit: int = 100, offset: int = 0) -> list[Record]:
        if limit <= 0:
            return []
        h, z = self.keys(kind)
        start = max(offset, 0)
        try:
            # bytes or str, as the client decodes; HMGET takes either.
            keys = cast(list[Any], await self.client.zrange(z, start, start + limit - 1))
            if not keys:
                return []
            values = await self.client.hmget(h, keys)
        except (redis_exc.RedisError, OSError) as exc:
            raise _storage_error(exc) from exc
        # A record deleted between the two reads is skipped.
        return [r for r in map(_load, values) if r is not None]

    async def delete(self, kind: str, key: str) -> Record | None:
        h, z = self.keys(kind)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hget(h, key)
                pipe.hdel(h, key)
                pipe.zrem(z, key)
                found, removed, _ = await pipe.execute()
        except (redis_exc.RedisError, OSError) as exc:
            raise _storage_error(exc) from exc
        return _load(found) if removed else None

    async def aclose(self) -> None:
        if self._owned:
            await self.client.aclose()


def _load(value: Any) -> Record | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    loaded = json.loads(value)
    return loaded if isinstance(loaded, dict) else None


def _storage_error(exc: BaseException) -> StorageError:
    if isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError | OSError):
        return StorageUnavailableError(f"the record store cannot be reached: {exc}")
    return StorageError(f"the record store failed: {exc}")
