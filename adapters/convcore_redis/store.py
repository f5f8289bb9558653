"""RedisStore: conversations in Redis or Redis Cluster, one script per turn.

Round trips: an append is one EVALSHA on a single server; on a cluster it
is one EVALSHA on the conversation's node, then one pipelined round that
bumps the listing indexes on their nodes. ``read_tail``, ``read_messages``,
``get_turn`` and ``get_conversation`` are one round trip each, whatever the
history's length. On a single server, script calls in flight at the same
time share writes (batching.py). See README.md beside this file for the
key layout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from convcore.errors import ConflictError, InvalidRequestError
from convcore.models import (
    AppendResult,
    Conversation,
    Message,
    TurnContext,
    TurnRecord,
    TurnWrite,
    trusted,
)
from convcore.storekit import check_turn_owner, conflict_message, number_messages, turn_record

from . import scripts
from .batching import ScriptBatcher
from .codec import (
    MessageCache,
    as_str,
    decode_conversation,
    decode_meta,
    decode_turn,
    encode_turn,
    pairs_to_dict,
)
from .errors import driver_errors, mapped
from .keys import ConversationKeys, IndexKeys, check_prefix
from .pool import resilient_options
from .records import RedisRecords

__all__ = ["RedisStore"]

AnyRedis = Redis | RedisCluster
_SCHEMES = {"redis": False, "rediss": False, "redis+cluster": True, "rediss+cluster": True}
_LIST_ATTEMPTS = 4


class RedisStore:
    """A :class:`~convcore.Storage` on a Redis server or cluster: the
    conversations, and in :attr:`records` the chat modes' records, on one
    client under one prefix.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``
    that the caller owns: :meth:`aclose` leaves it open. All keys start with
    ``prefix`` (no braces). With ``ttl`` (seconds) every key of a
    conversation expires that long after its latest append. Nothing talks to
    the server before the first call.

    At most ``max_concurrency`` operations of this store are in flight at
    once; more wait their turn. redis-py raises rather than waits when its
    pool (100 connections a node by default) runs out, so keep this below
    the client's pool size.

    Decoded messages are cached by their stored bytes (``message_cache``
    entries, 0 for none), appended ones from the moment they are written: a
    turn re-reads the window the previous turn read and wrote, and a stored
    message never changes, so a cached one is never stale.
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        prefix: str = "convcore",
        ttl: int | None = None,
        max_concurrency: int = 64,
        message_cache: int = 16_384,
        autopipeline: bool = True,
    ) -> None:
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency!r}")
        self.client = client
        self.prefix = check_prefix(prefix)
        self.ttl = ttl
        self.cluster = isinstance(client, RedisCluster)
        self._index = IndexKeys(self.prefix)
        self._owned = False
        self._slots: asyncio.Semaphore | None = asyncio.Semaphore(max_concurrency)
        self._messages = MessageCache(message_cache)
        self._append = client.register_script(scripts.APPEND)
        self._read_tail = client.register_script(scripts.READ_TAIL)
        self._read_messages = client.register_script(scripts.READ_MESSAGES)
        self._get_turn = client.register_script(scripts.GET_TURN)
        self._read_context = client.register_script(scripts.READ_CONTEXT)
        self._delete = client.register_script(scripts.DELETE)
        self.records = RedisRecords(self)
        # One server, pooled connections: concurrent calls share writes.
        single = getattr(client, "single_connection_client", False)
        self._batcher = (
            ScriptBatcher(client) if autopipeline and isinstance(client, Redis) and not single else None
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str | None = None,
        ttl: int | None = None,
        max_concurrency: int = 64,
        message_cache: int = 16_384,
        autopipeline: bool = True,
        client: AnyRedis | None = None,
        **client_options: Any,
    ) -> Self:
        """A store that owns a client for ``url``: ``redis://``, ``rediss://``,
        ``redis+cluster://`` or ``rediss+cluster://`` (any node of the cluster).

        ``prefix`` and ``ttl`` may also come as query parameters
        (``redis://host:6379/0?prefix=app&ttl=86400``); keyword arguments win.
        Other keyword arguments go to the redis-py client. With ``client``
        (say a fakeredis client in tests) the URL gives only those options:
        the store uses that client and leaves it open on :meth:`aclose`.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise InvalidRequestError(
                f"not a Redis URL: {scheme!r}; use redis://, rediss://, redis+cluster:// or rediss+cluster://",
                field="store_url",
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in {"prefix", "ttl"}}
        rest = urlencode([(k, v) for k, v in query if k not in ours])
        plain = urlunsplit((scheme.removesuffix("+cluster"), parts.netloc, parts.path, rest, parts.fragment))
        if prefix is None:
            prefix = ours.get("prefix", "convcore")
        if ttl is None and ours.get("ttl"):
            ttl = int(ours["ttl"])
        owned = client is None
        if client is not None:
            if client_options:
                raise InvalidRequestError(
                    f"client options {sorted(client_options)} do not apply to a client passed in",
                    field="store_url",
                )
        elif _SCHEMES[scheme]:
            client = RedisCluster.from_url(plain, **resilient_options(True, **client_options))
        else:
            # A pool that waits for a free connection instead of raising, so
            # this store needs no semaphore of its own in front of it.
            options = {"max_connections": 100, **resilient_options(False, **client_options)}
            client = Redis(connection_pool=BlockingConnectionPool.from_url(plain, **options))
            client.auto_close_connection_pool = True
        store = cls(
            client,
            prefix=prefix,
            ttl=ttl,
            max_concurrency=max_concurrency,
            message_cache=message_cache,
            autopipeline=autopipeline,
        )
        if not owned:
            return store
        if not store.cluster:
            store._slots = None
        store._owned = True
        return store

    def _op(self, action: str) -> _Operation:
        """One bounded operation, its driver errors mapped."""
        return _Operation(self, action)

    async def _script(self, script: AsyncScript, keys: list[str], args: list[str]) -> Any:
        if self._batcher is not None:
            return await self._batcher.run(script, keys, args)
        return await script(keys=keys, args=args)

    def _keys(self, conv_uid: str) -> ConversationKeys:
        return ConversationKeys.of(self.prefix, conv_uid)

    def _flag(self) -> str:
        """'1' when the scripts may update the indexes themselves (one server)."""
        return "0" if self.cluster else "1"

    def _script_keys(self, keys: ConversationKeys) -> list[str]:
        return keys.all() if self.cluster else [*keys.all(), self._index.all]

    # -- the store protocol ------------------------------------------------

    async def get_conversation(self, conv_uid: str) -> Conversation | None:
        async with self._op("reading a conversation"):
            meta = pairs_to_dict(await self.client.hgetall(self._keys(conv_uid).meta))
            return decode_conversation(meta) if meta else None

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        keys = self._keys(turn.conv_uid)
        messages, (static, chat_param, model, system, record) = encode_turn(turn)
        ix_user, ix_sys, ix_us = self._index.of_conversation(turn.user_name, turn.sys_code)
        args = [
            turn.turn_id,
            "" if turn.expect_last_seq is None else str(turn.expect_last_seq),
            static,
            turn.chat_mode,
            chat_param,
            model,
            "1" if turn.model else "0",
            system,
            repr(turn.created_at),
            record,
            "" if self.ttl is None else str(self.ttl),
            self._flag(),
            ix_user,
            ix_sys,
            ix_us,
            turn.conv_uid,
            str(len(turn.messages)),
            "1" if turn.owned_only else "0",
            *messages,
        ]
        async with self._op("appending a turn"):
            reply = await self._script(self._append, self._script_keys(keys), args)
            status = as_str(reply[0])
            if status == "conflict":
                last = int(as_str(reply[1]))
                raise ConflictError(conflict_message(turn.conv_uid, turn.expect_last_seq or 0, last))
            if status == "owner":
                check_turn_owner(decode_meta(reply[1]), turn)  # raises: the script refused the owner
                raise AssertionError("the store refused an owner its rule accepts")  # pragma: no cover
            if status == "dup":
                meta = reply[1]
                result = trusted(
                    AppendResult,
                    conversation=decode_meta(meta),
                    turn=decode_turn(reply[2], reply[3]),
                    duplicate=True,
                )
            else:
                meta = reply[2]
                first = int(reply[1])
                stored = number_messages(turn, first)
                # What the script stored for each message, so the next read needs no decoding.
                keep = self._messages.keep
                for i, message in enumerate(stored):
                    keep(f'{{"seq":{first + i},{messages[2 * i + 1]}'.encode(), message)
                result = trusted(
                    AppendResult,
                    conversation=decode_meta(meta),
                    turn=turn_record(turn, stored),
                    duplicate=False,
                )
            if self.cluster:
                # A duplicate bumps too: it heals an append whose second round was lost.
                await self._bump_indexes(turn.conv_uid, meta)
            return result

    async def get_turn(self, conv_uid: str, turn_id: str) -> TurnRecord | None:
        keys = self._keys(conv_uid)
        async with self._op("reading a turn"):
            reply = await self._script(self._get_turn, [keys.meta, keys.turns, keys.msgs], [turn_id])
            return None if reply is None else decode_turn(reply[0], reply[1])

    async def read_tail(self, conv_uid: str, max_tokens: int) -> list[Message]:
        if max_tokens < 0:
            return []
        keys = self._keys(conv_uid)
        async with self._op("reading a conversation's tail"):
            reply = await self._script(self._read_tail, [keys.meta, keys.cum, keys.msgs], [str(max_tokens)])
            return self._messages.decode(reply)

    async def read_context(
        self, conv_uid: str, max_tokens: int, *, turn_id: str | None = None
    ) -> TurnContext:
        keys = self._keys(conv_uid)
        args = [str(max(max_tokens, -1)), turn_id or ""]
        async with self._op("reading a turn's context"):
            reply = await self._script(self._read_context, [keys.meta, keys.cum, keys.msgs, keys.turns], args)
            # Decoded inside the operation: an unreadable record is a StorageError.
            if not reply:
                return TurnContext(conversation=None)
            conversation = decode_meta(reply[0])
            if reply[1]:
                return TurnContext(conversation=conversation, turn=decode_turn(reply[1], reply[2]))
            return TurnContext(conversation=conversation, tail=tuple(self._messages.decode(reply[3])))

    async def read_messages(
        self, conv_uid: str, *, start_seq: int = 1, limit: int | None = None
    ) -> list[Message]:
        keys = self._keys(conv_uid)
        args = [str(start_seq), "" if limit is None else str(max(limit, 0))]
        async with self._op("reading messages"):
            reply = await self._script(self._read_messages, [keys.meta, keys.msgs], args)
            return self._messages.decode(reply)

    async def list_conversations(
        self,
        *,
        user_name: str | None = None,
        sys_code: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> list[Conversation]:
        if limit <= 0:
            return []
        offset = max(offset, 0)
        index = self._index.for_filters(user_name, sys_code)
        convs: list[Conversation] = []
        async with self._op("listing conversations"):
            # An entry whose conversation is gone (expired, or deleted while a
            # cluster append was bumping it) is removed and the page read again.
            for _ in range(_LIST_ATTEMPTS):
                members = [
                    as_str(m) for m in await self.client.zrange(index, offset, offset + limit - 1, desc=True)
                ]
                if not members:
                    return []
                metas = await self._metas(members)
                convs, stale = [], []
                for member, meta in zip(members, metas, strict=True):
                    conv = decode_conversation(meta) if meta else None
                    if (
                        conv is None
                        or conv.conv_uid != member
                        or (user_name is not None and conv.user_name != user_name)
                        or (sys_code is not None and conv.sys_code != sys_code)
                    ):
                        stale.append(member)
                    else:
                        convs.append(conv)
                if not stale:
                    break
                await self.client.zrem(index, *stale)
        return convs

    async def delete_conversation(self, conv_uid: str) -> bool:
        keys = self._keys(conv_uid)
        async with self._op("deleting a conversation"):
            reply = await self._script(self._delete, self._script_keys(keys), [self._flag(), conv_uid])
            existed = int(as_str(reply[0])) == 1
            if self.cluster:
                indexes = [self._index.all, *(as_str(k) for k in reply[1:])]
                async with self.client.pipeline(transaction=False) as pipe:
                    for index in indexes:
                        if index:
                            pipe.zrem(index, conv_uid)
                    await pipe.execute()
            return existed

    async def aclose(self) -> None:
        """Close the client if :meth:`from_url` made it; a client passed in stays open."""
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._owned:
            with driver_errors("closing the connection"):
                await self.client.aclose()

    # -- internals ----------------------------------------------------------

    async def _bump_indexes(self, conv_uid: str, meta: Sequence[Any]) -> None:
        """Cluster only: raise the conversation's score in its indexes to its
        updated_at (GT: a late, older bump never lowers it), and with a TTL
        drop the entries idle for two TTLs, as the append script does on one
        server. ``meta`` is the append script's, index keys included."""
        updated = float(meta[5])
        async with self.client.pipeline(transaction=False) as pipe:
            for index in (self._index.all, *meta[8:11]):
                if index:
                    pipe.zadd(index, {conv_uid: updated}, gt=True)
                    if self.ttl is not None:
                        pipe.zremrangebyscore(index, "-inf", f"({updated - 2 * self.ttl:.6f}")
            await pipe.execute()

    async def _metas(self, conv_uids: Sequence[str]) -> list[dict[str, str]]:
        """The metadata hashes of several conversations in one pipelined round."""
        async with self.client.pipeline(transaction=False) as pipe:
            for uid in conv_uids:
                pipe.hgetall(self._keys(uid).meta)
            replies = await pipe.execute()
        return [pairs_to_dict(r) for r in replies]


class _Operation:
    """``async with store._op(action)``: a slot if the store bounds its
    operations, the cluster client initialised, driver errors mapped. A
    class rather than a generator-based context manager: every call of
    every turn goes through it."""

    __slots__ = ("action", "store")

    def __init__(self, store: RedisStore, action: str) -> None:
        self.store = store
        self.action = action

    async def __aenter__(self) -> None:
        store = self.store
        if store._slots is not None:
            await store._slots.acquire()
        if store.cluster:
            try:
                # redis-py 8 races when a fresh cluster client meets
                # concurrent commands; its own lock makes this a no-op after.
                await store.client.initialize()
            except BaseException as exc:
                await self.__aexit__(type(exc), exc, None)
                raise

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if self.store._slots is not None:
            self.store._slots.release()
        if exc is not None and (error := mapped(self.action, exc)) is not None:
            raise error from exc
