"""The conversation engine: one turn in, one reply out, history kept.

A turn is prepared (request checked, window built within the budget),
generated, then appended to the store in one atomic write, by the engine as
the :class:`~convcore.runner.TurnRunner` both whole and streamed turns run
through (its stages are in :mod:`convcore.stages`). Nothing is stored
before generation succeeds, so a failed turn leaves the history as it was.

Concurrent turns on one conv_uid each see the history as it was when they
started and are appended whole, in the order they finish. With
``serialize=True`` turns of one conversation take turns: each sees the
previous reply. In-process a per-conversation lock does that; across
processes the append is conditional on the last seq the window saw, and a
turn that loses the race is generated again (up to ``conflict_retries``);
a stream, whose text has already gone out, ends with ConflictError instead
and stores nothing.

Streams: if the consumer stops before the backend has finished, the backend
is closed and nothing is stored. Once the backend has finished, the turn is
stored even if the consumer is gone by then (the scene's finishing and the
store's append run to the end, holding a serialised conversation's lock),
and the last piece of text and the final chunk (with
``finish_reason`` and ``usage``) is yielded only after it is stored.

The parts of a turn (prepare, store read, generation, store append) and
what the turn was are told to the observer installed with
:func:`convcore.observe.observing`, if any (the HTTP service installs one).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from .compaction import Compactor
from .content import DEFAULT_MAX_INLINE_BYTES
from .errors import ConflictError, ConversationNotFoundError, ForkPointError, InvalidRequestError
from .fork import fork_conversation
from .ids import random_id
from .models import Conversation, Message
from .observe import span
from .protocols import ConversationStore
from .registry import ModelRegistry
from .runner import TurnRunner
from .scenes import Scene, SceneRegistry
from .schema import ChatCompletion, ChatCompletionChunk, ChatRequest, parse_chat_request
from .storekit import check_owner
from .streaming import TurnStream

__all__ = ["Engine", "TurnStream"]

_CONV_NAMESPACE = uuid.UUID("6f1c1a52-3d0e-4c38-9a53-2b8f4f3c0d11")
# The largest offset, limit or start_seq accepted: every store's integers
# (int64 columns, Redis' Lua doubles) hold it plus a page with room to spare.
MAX_INDEX = 2**48


class Engine(TurnRunner):
    """Multi-turn chat over a store and a model registry.

    An engine is the :class:`~convcore.runner.TurnRunner` its streamed and
    whole turns run through, with the request's edge in front (ids,
    parsing) and the conversations' reads. It does not own ``store`` or the
    backends unless ``owned=True`` (then :meth:`aclose` closes them).
    ``max_inline_bytes`` bounds each data URL or base64 payload in a
    message's content parts.
    """

    def __init__(
        self,
        store: ConversationStore,
        models: ModelRegistry,
        *,
        serialize: bool = False,
        keep_first_rounds: int = 0,
        conflict_retries: int = 8,
        scenes: SceneRegistry | Sequence[Scene] | None = None,
        clock: Callable[[], float] = time.time,
        owned: bool = False,
        max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES,
        compaction: Compactor | None = None,
        compact: bool | None = None,
    ) -> None:
        super().__init__(
            store,
            models,
            scenes=scenes,
            keep_first_rounds=keep_first_rounds,
            max_inline_bytes=max_inline_bytes,
            compaction=compaction,
            compact=compact,
            clock=clock,
        )
        self.serialize = serialize
        self.conflict_retries = conflict_retries
        self._owned = owned
        self._locks = self.locks

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            for backend in self.models.backends():
                await backend.aclose()
            await self.store.aclose()

    # -- turns -------------------------------------------------------------

    async def chat(
        self, request: ChatRequest | dict[str, Any], *, owned_only: bool = False
    ) -> ChatCompletion:
        """Run one turn and return the whole reply. ``owned_only``: the
        request's user_name is a bound identity (see :mod:`convcore.owners`),
        so only a conversation carrying it may be continued."""
        req = parse_chat_request(request)
        conv_uid, turn_id = self._ids(req)
        return await self.run_turn(
            req,
            conv_uid,
            turn_id,
            serialize=self._serialize(req),
            owned_only=owned_only,
            conflict_retries=self.conflict_retries,
        )

    async def open_stream(
        self, request: ChatRequest | dict[str, Any], *, owned_only: bool = False
    ) -> TurnStream:
        """Check the request and build its window now, so bad input fails
        here rather than mid-stream; iterate the result for the chunks. A
        serialised turn's window waits for the conversation's previous
        turn, so it is built on the first step (before any chunk); what
        needs no store read is still checked here."""
        req = parse_chat_request(request)
        conv_uid, turn_id = self._ids(req)
        serialize = self._serialize(req)
        spec = self.check(req)
        first = None
        if not serialize:
            with span("convcore.prepare"):
                first = await self.prepare(
                    req, conv_uid, turn_id, serialize=False, owned_only=owned_only, spec=spec
                )
        return TurnStream(
            self,
            req,
            conv_uid,
            turn_id,
            serialize=serialize,
            first=first,
            spec=spec,
            owned_only=owned_only,
        )

    async def chat_stream(
        self, request: ChatRequest | dict[str, Any], *, owned_only: bool = False
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Run one turn, yielding the reply as it is generated."""
        stream = await self.open_stream(request, owned_only=owned_only)
        async with aclosing(stream):
            async for chunk in stream:
                yield chunk

    # -- conversations -----------------------------------------------------

    async def get_conversation(
        self,
        conv_uid: str,
        *,
        user_name: str | None = None,
        sys_code: str | None = None,
        owned_only: bool = False,
    ) -> Conversation:
        """The conversation; NotFound if missing, PermissionDenied if it
        belongs to another user_name or sys_code than the ones given (with
        ``owned_only``, also if it has no user_name)."""
        conv = await self.store.get_conversation(conv_uid)
        if conv is None:
            raise ConversationNotFoundError(conv_uid)
        check_owner(conv, user_name, sys_code, owned_only)
        return conv

    async def read_messages(
        self,
        conv_uid: str,
        *,
        start_seq: int = 1,
        limit: int | None = None,
        user_name: str | None = None,
        sys_code: str | None = None,
        owned_only: bool = False,
    ) -> list[Message]:
        _check_paging(limit=limit, start_seq=start_seq)
        await self.get_conversation(conv_uid, user_name=user_name, sys_code=sys_code, owned_only=owned_only)
        return await self.store.read_messages(conv_uid, start_seq=start_seq, limit=limit)

    async def list_conversations(
        self,
        *,
        user_name: str | None = None,
        sys_code: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> list[Conversation]:
        _check_paging(limit=limit, offset=offset)
        return await self.store.list_conversations(
            user_name=user_name, sys_code=sys_code, limit=limit, offset=offset
        )

    async def fork(
        self,
        conv_uid: str,
        up_to_seq: int,
        *,
        new_conv_uid: str | None = None,
        user_name: str | None = None,
        sys_code: str | None = None,
        owned_only: bool = False,
    ) -> Conversation:
        """A new conversation holding this one's messages 1..``up_to_seq``
        (and its system prompt, model, mode and owner); the way to edit an
        earlier message or regenerate a reply: fork before it, then send
        the new (or same) message to the fork. ``new_conv_uid`` defaults to
        a fresh one; one that exists already is a ConflictError. The owner
        is checked as :meth:`get_conversation` does."""
        source = await self.get_conversation(
            conv_uid, user_name=user_name, sys_code=sys_code, owned_only=owned_only
        )
        try:
            return await fork_conversation(
                self.store, source, up_to_seq, new_conv_uid=new_conv_uid, now=self.clock
            )
        except ForkPointError:
            raise
        except ConflictError as exc:
            raise ConflictError(
                f"conversation {new_conv_uid!r} already exists; fork into a new conv_uid"
            ) from exc

    async def delete_conversation(
        self,
        conv_uid: str,
        *,
        user_name: str | None = None,
        sys_code: str | None = None,
        owned_only: bool = False,
    ) -> bool:
        """Delete it; False if it did not exist."""
        try:
            await self.get_conversation(
                conv_uid, user_name=user_name, sys_code=sys_code, owned_only=owned_only
            )
        except ConversationNotFoundError:
            return False
        deleted = await self.store.delete_conversation(conv_uid)
        if self.compaction is not None:
            await self.compaction.forget(conv_uid)
        return deleted

    # -- internals ---------------------------------------------------------

    def _ids(self, req: ChatRequest) -> tuple[str, str]:
        turn_id = req.request_id or random_id()
        if req.conv_uid:
            return req.conv_uid, turn_id
        if req.request_id:
            # A retried first turn must land in the same new conversation; the
            # owner is part of the name, so another caller reusing the id
            # starts a conversation of its own instead of seeing this one.
            owner = f"{req.user_name or ''}\x00{req.sys_code or ''}\x00{req.request_id}"
            return uuid.uuid5(_CONV_NAMESPACE, owner).hex, turn_id
        return random_id(), turn_id

    def _serialize(self, req: ChatRequest) -> bool:
        return self.serialize if req.serialize is None else req.serialize


def _check_paging(**values: int | None) -> None:
    for name, value in values.items():
        lowest = 1 if name == "start_seq" else 0
        if value is not None and not lowest <= value <= MAX_INDEX:
            raise InvalidRequestError(f"must be between {lowest} and {MAX_INDEX}, got {value}", field=name)
