"""Stored shapes: messages, conversations, turns.

These are what a store keeps and returns. They are frozen: a stored message
never changes, and a store hands out copies it cannot be hurt by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .content import ContentPart

__all__ = [
    "INSTRUCTION_ROLES",
    "AppendResult",
    "ContentPart",
    "Conversation",
    "FinishReason",
    "FunctionCall",
    "Message",
    "MessageDraft",
    "PromptMessage",
    "Role",
    "ToolCall",
    "TurnContext",
    "TurnRecord",
    "TurnWrite",
    "trusted",
    "trusted_copy",
]

Role = Literal["system", "developer", "user", "assistant", "tool"]
# Conversation instructions: kept as the conversation's system prompt, not logged.
INSTRUCTION_ROLES: frozenset[str] = frozenset({"system", "developer"})
FinishReason = Literal["stop", "length", "tool_calls"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_LENIENT = ConfigDict(frozen=True, extra="ignore")


class FunctionCall(BaseModel):
    """The function a tool call invokes; ``arguments`` is the model's JSON text, kept verbatim."""

    model_config = _LENIENT

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call of an assistant message, in OpenAI's shape (keys it
    does not define, such as a streamed call's ``index``, are dropped)."""

    model_config = _LENIENT

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class PromptMessage(BaseModel):
    """A message as the model sees it.

    Stored messages are PromptMessages too, so a window hands the history to
    the backend as it is; a backend should read only these fields.
    ``parts``, when set, is the content as the client sent it (images,
    audio, files and text, in order); ``content`` is then its text parts
    joined, which is what text-only code reads. An assistant message that
    calls tools has ``tool_calls`` (its content is often empty); a ``tool``
    message answers one of them by ``tool_call_id``.
    """

    model_config = _FROZEN

    role: Role
    content: str
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    parts: tuple[ContentPart, ...] | None = None


class MessageDraft(PromptMessage):
    """A message before the store gives it a place in the conversation.

    ``token_count`` is the message's full cost in the prompt (content, role,
    name and the chat format's per-message overhead), counted once by the
    engine with the conversation's encoding. ``starts_round`` marks the first
    message of a round (a user message and what answers it), so a window can
    be cut at round boundaries without reading earlier messages.
    """

    token_count: int = Field(ge=0)
    starts_round: bool = False


class Message(MessageDraft):
    """A stored message: ``seq`` is gapless from 1 within its conversation."""

    seq: int = Field(ge=1)
    turn_id: str
    created_at: float


class Conversation(BaseModel):
    """A conversation's metadata; ``system`` is its current system prompt.

    System messages are conversation state rather than log entries: a client
    that re-sends the same system prompt every turn replaces it instead of
    piling copies into the history, and every window keeps it.
    ``total_tokens`` sums the token counts of the logged (non-system)
    messages, in ``encoding``.
    """

    model_config = _FROZEN

    conv_uid: str
    user_name: str | None = None
    sys_code: str | None = None
    chat_mode: str = "chat_normal"
    chat_param: str | None = None
    model: str | None = None
    encoding: str
    system: tuple[MessageDraft, ...] = ()
    created_at: float
    updated_at: float
    message_count: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)


class TurnRecord(BaseModel):
    """One stored turn: the idempotency record and the messages it added."""

    model_config = _FROZEN

    conv_uid: str
    turn_id: str
    model: str | None = None
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: FinishReason
    created_at: float
    messages: tuple[Message, ...]
    params: dict[str, Any] | None = None  # the parameters that shaped the reply

    @property
    def reply(self) -> Message:
        """The assistant message that ended the turn."""
        return self.messages[-1]


class TurnWrite(BaseModel):
    """Everything a store needs to append one turn atomically.

    ``messages`` are the turn's new non-system messages, the reply last.
    ``params`` are the generation parameters sent (temperature included),
    kept with the turn as what shaped its reply.
    ``system`` replaces the conversation's system prompt when not None.
    The metadata fields fill a conversation the append creates; on an
    existing one only ``model``/``chat_mode``/``chat_param`` are refreshed.
    With ``expect_last_seq`` set, the append happens only if the
    conversation's last seq is exactly that (0 for a new conversation).
    An existing conversation takes the turn only if ``user_name`` and
    ``sys_code`` may use it (with ``owned_only``, only if it has a
    user_name): see :func:`convcore.storekit.check_turn_owner`.
    """

    model_config = _FROZEN

    conv_uid: str
    turn_id: str
    messages: tuple[MessageDraft, ...] = Field(min_length=1)
    system: tuple[MessageDraft, ...] | None = None
    encoding: str
    model: str | None = None
    user_name: str | None = None
    sys_code: str | None = None
    chat_mode: str = "chat_normal"
    chat_param: str | None = None
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: FinishReason = "stop"
    params: dict[str, Any] | None = None
    expect_last_seq: int | None = None
    created_at: float
    owned_only: bool = False


class AppendResult(BaseModel):
    """What an append did: ``duplicate`` means the turn_id was already stored
    and nothing was written; ``turn`` is then the earlier turn."""

    model_config = _FROZEN

    conversation: Conversation
    turn: TurnRecord
    duplicate: bool


@dataclass(frozen=True)
class TurnContext:
    """What a turn reads before generating, in one go: the conversation
    (None if new), its newest messages within a budget, and the stored turn
    for a retried request id (None if not stored).

    A plain dataclass: its parts are already validated models, and a window
    can hold thousands of messages that need not be checked again.
    """

    conversation: Conversation | None
    tail: tuple[Message, ...] = ()
    turn: TurnRecord | None = None


B = TypeVar("B", bound=BaseModel)
_defaults: dict[type[BaseModel], tuple[dict[str, Any], tuple[tuple[str, Any], ...]]] = {}


def trusted(cls: type[B], /, **values: Any) -> B:
    """A ``cls`` holding ``values``, which the engine built from values
    already validated, so they are not validated again (this is several
    times cheaper than validation or ``model_construct``). Fields left out
    take their defaults. Never use it on anything a caller sent."""
    defaults = _defaults.get(cls)
    if defaults is None:
        # Every field, in the model's order (which its JSON follows); required ones are in ``values``.
        fixed = {n: f.default for n, f in cls.model_fields.items()}
        made = tuple(
            (n, f.default_factory) for n, f in cls.model_fields.items() if f.default_factory is not None
        )
        defaults = _defaults[cls] = (fixed, made)
    fixed, made = defaults
    data = {**fixed, **values}
    for name, factory in made:
        if name not in values:
            data[name] = factory()  # type: ignore[call-arg]  # none of ours takes the data
    return _adopt(cls, data, set(values))


def trusted_copy(model: BaseModel, cls: type[B], /, **changes: Any) -> B:
    """``model``'s values with ``changes``, as a ``cls`` (``model``'s class, or
    a subclass whose extra fields, which come last, are all in ``changes``),
    without validation; see :func:`trusted`."""
    data = {**model.__dict__, **changes}
    return _adopt(cls, data, set(data))


def _adopt(cls: type[B], data: dict[str, Any], fields_set: set[str]) -> B:
    obj = _new(cls)
    _set_dict(obj, data)
    _set_fields_set(obj, fields_set)
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


# The slots every model has, set through their descriptors: a third fewer
# instructions than object.__setattr__ by name (each turn builds ~17 models).
_new = object.__new__
_slots = BaseModel.__dict__
_set_dict = _slots["__dict__"].__set__
_set_fields_set = _slots["__pydantic_fields_set__"].__set__
_set_extra = _slots["__pydantic_extra__"].__set__
_set_private = _slots["__pydantic_private__"].__set__
