"""The three seams of convcore: store, model backend, tokenizer.

Anything that has these methods plugs in; nothing needs to inherit. Each
docstring states the contract at the edges, and ``tests/contract`` checks it
for every implementation.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol, runtime_checkable

from .generation import Generation, GenerationChunk, GenerationRequest
from .models import AppendResult, Conversation, Message, TurnContext, TurnRecord, TurnWrite
from .records import RecordStore

__all__ = ["ConversationStore", "ModelBackend", "Storage", "Tokenizer"]


@runtime_checkable
class ConversationStore(Protocol):
    """Where conversations live, keyed by conv_uid.

    Safe for concurrent use from many tasks at once; a store that talks to a
    server is also safe across processes. Driver errors surface as
    :class:`~convcore.errors.StorageError` (or ``StorageUnavailableError``).
    """

    async def get_conversation(self, conv_uid: str) -> Conversation | None:
        """The conversation's metadata, or None if it does not exist."""
        ...

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        """Append one turn atomically: all its messages or none.

        Creates the conversation if it does not exist. The messages get the
        next gapless seqs, in the order given, adjacent to each other however
        many appends race. If ``turn.turn_id`` is already stored for this
        conversation, nothing is written and the earlier turn comes back with
        ``duplicate=True`` (checked before ``expect_last_seq``). If
        ``expect_last_seq`` is set and the conversation's last seq differs
        (0 when it does not exist), raises
        :class:`~convcore.errors.ConflictError` and writes nothing.
        """
        ...

    async def get_turn(self, conv_uid: str, turn_id: str) -> TurnRecord | None:
        """The stored turn with this id, or None (also for a missing conversation)."""
        ...

    async def read_tail(self, conv_uid: str, max_tokens: int) -> list[Message]:
        """The longest run of newest messages whose token counts sum to at
        most ``max_tokens``, oldest first.

        Its cost depends on what it returns, not on the conversation's
        length. An empty list for a missing conversation or ``max_tokens``
        below the newest message's count.
        """
        ...

    async def read_context(
        self, conv_uid: str, max_tokens: int, *, turn_id: str | None = None
    ) -> TurnContext:
        """``get_conversation``, ``read_tail(max_tokens)`` and, with
        ``turn_id``, ``get_turn`` at once: what a turn reads before it
        generates. When the turn is found its reply is all the caller needs,
        so the tail may then be empty. Stores that can do it in one round
        trip should; the parts are consistent with each other where the
        store can promise it.
        """
        ...

    async def read_messages(
        self, conv_uid: str, *, start_seq: int = 1, limit: int | None = None
    ) -> list[Message]:
        """Messages with seq >= ``start_seq`` in seq order, at most ``limit``
        of them (all when None); empty for a missing conversation."""
        ...

    async def list_conversations(
        self,
        *,
        user_name: str | None = None,
        sys_code: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> list[Conversation]:
        """Conversations matching every filter given, most recently updated
        first, paged by ``offset``/``limit``."""
        ...

    async def delete_conversation(self, conv_uid: str) -> bool:
        """Remove the conversation, its messages and turn records and its
        index entries. True if it existed; deleting a missing one is a no-op."""
        ...

    async def aclose(self) -> None:
        """Release what the store opened itself; a client passed in stays open."""
        ...


@runtime_checkable
class Storage(ConversationStore, Protocol):
    """One backend's storage, as :func:`~convcore.open_store` returns it: the
    conversation store, and the chat modes' records beside it.

    Both facets share one engine or client (one connection pool), one URL's
    ``prefix`` / ``table_prefix``, one error mapping and retry policy and one
    schema. The storage owns the connections: its ``aclose()`` releases them,
    the records facet's ``aclose()`` releases nothing.
    """

    @property
    def records(self) -> RecordStore:
        """Apps, datasources, knowledge and flows, on this storage's connections."""
        ...


@runtime_checkable
class ModelBackend(Protocol):
    """Generates replies. Errors surface as :class:`~convcore.errors.BackendError`.

    ``supported_params`` names the OpenAI parameters (``convcore.params``)
    the backend honours; the engine refuses a turn asking for any other, so
    a backend never has to drop one. An entry ``"name:kind"`` allows only
    values of that ``type`` (``"response_format:json_object"``). A backend
    without the attribute supports none.
    """

    supported_params: frozenset[str]

    async def complete(self, request: GenerationRequest) -> Generation:
        """The whole reply at once."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """The reply piece by piece; the last chunk has ``finish_reason``.

        Closing the iterator early (``aclose()``, or cancelling the task that
        iterates it) stops the generation, upstream request included.
        """
        ...

    async def aclose(self) -> None:
        """Release connections the backend opened."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """One exact encoding. ``name`` is the encoding's (``cl100k_base``)."""

    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> Sequence[int]:
        """Token ids of ``text``; special-token text is encoded as plain text."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``; an incomplete UTF-8 sequence decodes to U+FFFD."""
        ...

    def count(self, text: str) -> int:
        """``len(encode(text))``, possibly faster."""
        ...
