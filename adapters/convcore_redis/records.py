"""The records facet of :class:`~convcore_redis.RedisStore`: the chat modes'
apps, datasources, knowledge and flows, on the store's client.

Same client (one pool), prefix, operation bound and error mapping as the
conversations. Each kind's keys share one hash tag (see
:class:`~convcore_redis.keys.RecordKeys`), so a put or a delete is one
script on one node, on a single server and on a Cluster alike: the value,
the ordered key list and the owner indexes change together or not at all.

A listing reads one sorted set (all keys, or one owner's) by rank, then
the values: paging by ``offset`` stays exact under an owner filter. A
record stored before owners were indexed has no owner entry and so stays
ownerless until it is written again.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from convcore.errors import ConflictError
from convcore.records import Record, record_owner

from .keys import RecordKeys

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["RedisRecords"]

# KEYS: values, order, owners, then the owner indexes the new value belongs to.
# ARGV: key, value JSON, '1' for create-only, the owner index names joined by '\n'.
# Returns 0 when create-only found the key taken (nothing changed), else 1.
# The record's previous owner indexes, read from ``owners``, share the slot.
_PUT = """
local values, order, owners = KEYS[1], KEYS[2], KEYS[3]
local key = ARGV[1]
if ARGV[3] == '1' and redis.call('HEXISTS', values, key) == 1 then
  return 0
end
local before = redis.call('HGET', owners, key)
if before then
  for index in string.gmatch(before, '[^\\n]+') do
    redis.call('ZREM', index, key)
  end
end
redis.call('HSET', values, key, ARGV[2])
redis.call('ZADD', order, 0, key)
for i = 4, #KEYS do
  redis.call('ZADD', KEYS[i], 0, key)
end
if ARGV[4] == '' then
  redis.call('HDEL', owners, key)
else
  redis.call('HSET', owners, key, ARGV[4])
end
return 1
"""

# KEYS: values, order, owners. ARGV: key. Returns the removed value, or nil.
_DELETE = """
local values, order, owners = KEYS[1], KEYS[2], KEYS[3]
local key = ARGV[1]
local found = redis.call('HGET', values, key)
if not found then
  return false
end
redis.call('HDEL', values, key)
redis.call('ZREM', order, key)
local before = redis.call('HGET', owners, key)
if before then
  for index in string.gmatch(before, '[^\\n]+') do
    redis.call('ZREM', index, key)
  end
  redis.call('HDEL', owners, key)
end
return found
"""


class RedisRecords:
    """A :class:`~convcore.RecordStore` on a :class:`RedisStore`'s client.

    :meth:`aclose` releases nothing: the store owns the client.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._put = store.client.register_script(_PUT)
        self._delete = store.client.register_script(_DELETE)

    def keys(self, kind: str) -> RecordKeys:
        return RecordKeys.of(self._store.prefix, kind)

    async def put(self, kind: str, key: str, value: Record, *, create_only: bool = False) -> None:
        user_name, sys_code = record_owner(value)
        keys = self.keys(kind)
        indexes = keys.owner_indexes(user_name, sys_code)
        args = [key, json.dumps(value, ensure_ascii=False), "1" if create_only else "0", "\n".join(indexes)]
        async with self._store._op("storing a record"):
            stored = await self._put(keys=[keys.values, keys.order, keys.owners, *indexes], args=args)
        if not int(stored):
            raise ConflictError(f"{kind} {key!r} already exists")

    async def get(self, kind: str, key: str) -> Record | None:
        async with self._store._op("reading a record"):
            return _load(await self._store.client.hget(self.keys(kind).values, key))

    async def list(
        self,
        kind: str,
        *,
        limit: int = 100,
        offset: int = 0,
        user_name: str | None = None,
        sys_code: str | None = None,
    ) -> list[Record]:
        if limit <= 0:
            return []
        keys = self.keys(kind)
        start = max(offset, 0)
        async with self._store._op("listing records"):
            # bytes or str, as the client decodes; HMGET takes either.
            members = cast(
                list[Any],
                await self._store.client.zrange(keys.listing(user_name, sys_code), start, start + limit - 1),
            )
            if not members:
                return []
            values = await self._store.client.hmget(keys.values, members)
            # A record deleted between the two reads is skipped.
            return [r for r in map(_load, values) if r is not None]

    async def delete(self, kind: str, key: str) -> Record | None:
        keys = self.keys(kind)
        async with self._store._op("deleting a record"):
            return _load(await self._delete(keys=[keys.values, keys.order, keys.owners], args=[key]))

    async def aclose(self) -> None:
        """Nothing to release: the store owns the client."""
        return None


def _load(value: Any) -> Record | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    loaded = json.loads(value)
    return loaded if isinstance(loaded, dict) else None
