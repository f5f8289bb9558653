"""Wire shapes: the chat request of DB-GPT's API and OpenAI-style responses.

The request accepts every field DB-GPT's client sends (nulls included) and
OpenAI's ``max_tokens``; unknown fields are ignored so newer clients keep
working. :func:`parse_chat_request` turns pydantic's errors into one
:class:`~convcore.errors.InvalidRequestError` naming the field and reason.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .answer_schema import sent_always
from .content import PATTERN_MEANS, ContentPart, TextPart
from .errors import InvalidRequestError
from .models import INSTRUCTION_ROLES, FinishReason, FunctionCall, Role, ToolCall, trusted
from .params import NonNegativeInt, OpenAIParams, PositiveInt, Temperature
from .trim import TrimReport

__all__ = [
    "DEFAULT_CHAT_MODE",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatRequest",
    "Choice",
    "ChunkChoice",
    "Delta",
    "InputMessage",
    "ReplyMessage",
    "ToolCallDelta",
    "Usage",
    "parse_chat_request",
]

DEFAULT_CHAT_MODE = "chat_normal"
MAX_ID_LENGTH = 1024
MAX_NAME_LENGTH = 256

# The patterns below are checked by pydantic and stated in the JSON schema, in
# the syntax Python, Rust (pydantic-core) and ECMA-262 read alike: escapes only.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # str.isspace
# Unicode's Cc (C0, DEL, C1), Zl and Zp categories, exactly.
_CONTROL = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
# Holds something besides white space (what ``str.strip`` removes).
NOT_BLANK = f"[^{_SPACE}]"
# Non-blank and free of control characters and line breaks: ids end up in logs and headers.
PRINTABLE_ID = f"^[^{_CONTROL}]*[^{_CONTROL}{_SPACE}][^{_CONTROL}]*$"
_PRINTABLE_ID = re.compile(PRINTABLE_ID)


# What a value failing PRINTABLE_ID is told.
NOT_PRINTABLE_ID = "must be non-blank and free of control characters and line breaks"


def has_text(value: str | None) -> bool:
    """Whether ``value`` holds something besides white space: :data:`NOT_BLANK`,
    the one rule of what a message, a chat_param or a scene's text must hold."""
    return value is not None and not value.isspace() and value != ""


def is_printable_id(value: str) -> bool:
    """Whether ``value`` may be an id (conv_uid, request_id): :data:`PRINTABLE_ID`."""
    return _PRINTABLE_ID.search(value) is not None


_Id = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH, pattern=PRINTABLE_ID)
_Name = Field(default=None, max_length=MAX_NAME_LENGTH)


class InputMessage(BaseModel):
    """One message of a request.

    ``content`` may be OpenAI's list of parts. A list of text parts is
    joined into one string, as if sent so; a list with image, audio or file
    parts (user messages only) is kept whole in ``parts``, and ``content``
    holds its text. ``developer`` is OpenAI's newer name for ``system``. An
    assistant message that calls tools may have null content.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: Role
    content: StrictStr
    name: StrictStr | None = _Name
    tool_call_id: StrictStr | None = _Name
    tool_calls: tuple[ToolCall, ...] | None = None
    parts: tuple[ContentPart, ...] | None = None

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """The message as sent: ``content`` a string or a list of parts (there
        is no ``parts`` field to send), null only beside tool calls; the rules
        on roles that the validators below check."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        properties = schema["properties"]
        part_list = next(s for s in properties.pop("parts")["anyOf"] if s.get("type") == "array")
        properties["content"] = {
            "anyOf": [{"type": "string"}, part_list, {"type": "null"}],
            "description": "Text, or OpenAI's list of parts (image, audio and file parts in user messages "
            "only); null only in an assistant message with tool_calls",
        }
        schema["required"] = ["role"]

        def rule(when: dict[str, Any], then: dict[str, Any], *required: str) -> dict[str, Any]:
            return {
                "if": when,
                "then": {"properties": then, **({"required": list(required)} if required else {})},
            }

        def role_is(role: str, *, negate: bool = False) -> dict[str, Any]:
            const: dict[str, Any] = {"const": role}
            return {"properties": {"role": {"not": const} if negate else const}}

        text_only = {"type": "array", "items": {"properties": {"type": {"const": "text"}}}}
        no_text = {"not": {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}}}
        schema["allOf"] = [
            rule(no_text, {"tool_calls": {"type": "array", "minItems": 1}}, "tool_calls"),
            rule(
                role_is("assistant", negate=True),
                {"tool_calls": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}},
            ),
            rule(role_is("tool"), {"tool_call_id": {"type": "string", "minLength": 1}}, "tool_call_id"),
            rule(
                role_is("user", negate=True),
                {"content": {"anyOf": [{"type": ["string", "null"]}, text_only]}},
            ),
        ]
        return schema

    @model_validator(mode="before")
    @classmethod
    def _null_content_with_tool_calls(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("content") is None and data.get("tool_calls"):
            return {**data, "content": ""}
        return data

    @field_validator("content", "name")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        # A lone surrogate cannot be encoded as UTF-8: no store could keep it,
        # and it must be refused before the model is paid to answer it.
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from exc
        return value

    @model_validator(mode="before")
    @classmethod
    def _split_parts(cls, data: Any) -> Any:
        # Parts come only from a list ``content``; a ``parts`` key a client
        # sends itself is not a field of OpenAI's message.
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if k != "parts"}
        content = data.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            data["content"] = "".join(t for t in texts if isinstance(t, str))
            data["parts"] = content
        return data

    @model_validator(mode="after")
    def _media_on_user_messages(self) -> InputMessage:
        if self.parts is None:
            return self
        if all(isinstance(p, TextPart) for p in self.parts):
            object.__setattr__(self, "parts", None)  # text parts are just text
        elif self.role != "user":
            raise ValueError(f"image, audio and file parts belong in user messages, not {self.role}")
        return self


# What the messages validator checks that a JSON schema can say: some message
# besides the instructions. (That the last one is new input, not the
# assistant's and not empty, it cannot.)
_HAS_INPUT: dict[str, Any] = {
    "contains": {"properties": {"role": {"not": {"enum": sorted(INSTRUCTION_ROLES)}}}},
    "description": "The conversation's new messages; the last is the new input (not an assistant message, "
    "not empty)",
}


class ChatRequest(OpenAIParams):
    """A chat turn as DB-GPT's ``/api/v2/chat/completions`` and OpenAI take it.

    ``max_new_tokens`` wins over ``max_completion_tokens``, and that over
    ``max_tokens``. OpenAI's other parameters are :class:`OpenAIParams`.
    ``request_id`` is the idempotency key: a retry with the same one on the
    same conversation returns the stored reply instead of a second turn.
    ``require_existing`` makes a turn on a conv_uid that does not exist fail
    (ConversationNotFoundError) instead of starting that conversation.
    ``compact`` turns compaction on or off for this turn (engine default).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    messages: (
        Annotated[StrictStr, Field(pattern=NOT_BLANK, description="One user message")]
        | Annotated[list[InputMessage], Field(min_length=1, json_schema_extra=_HAS_INPUT)]
    )
    model: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_NAME_LENGTH)
    chat_mode: StrictStr | None = Field(default=None, max_length=MAX_NAME_LENGTH, pattern=NOT_BLANK)
    chat_param: StrictStr | None = Field(default=None, max_length=MAX_ID_LENGTH)
    max_new_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    stream: StrictBool | None = False
    conv_uid: StrictStr | None = _Id
    span_id: StrictStr | None = Field(default=None, max_length=MAX_ID_LENGTH)
    sys_code: StrictStr | None = _Name
    user_name: StrictStr | None = _Name
    request_id: StrictStr | None = _Id
    keep_first_rounds: NonNegativeInt | None = None
    serialize: StrictBool | None = None
    require_existing: StrictBool | None = None
    compact: StrictBool | None = None
    # DB-GPT's presentation switches: a stream's pieces (false: the whole text
    # so far in each chunk, over HTTP) and chat_data's chart view.
    incremental: StrictBool | None = None
    enable_vis: StrictBool | None = None

    @model_validator(mode="before")
    @classmethod
    def _chat_model_spelling(cls, value: Any) -> Any:
        # One table of DB-GPT's documentation spells the mode field ``chat_model``: honour it as chat_mode.
        if isinstance(value, dict) and value.get("chat_model") is not None:
            given, mode = value["chat_model"], value.get("chat_mode")
            if not isinstance(given, str):
                raise InvalidRequestError(f"must be a string, got {type(given).__name__}", field="chat_model")
            if mode is not None and mode != given:
                raise InvalidRequestError(
                    f"is {given!r} but chat_mode is {mode!r}; send one of them", field="chat_model"
                )
            value = {**value, "chat_mode": given}
        return value

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: str | list[InputMessage]) -> str | list[InputMessage]:
        if isinstance(value, str):
            if not has_text(value):
                raise ValueError("must not be empty")
            InputMessage._storable(value)
        elif not value:
            raise ValueError("must hold at least one message")
        else:
            roles = [m.role for m in value]
            if all(r in INSTRUCTION_ROLES for r in roles):
                raise ValueError("holds only system messages; add the user's input")
            if roles[-1] == "assistant":
                raise ValueError("ends with an assistant message; a turn needs new input after it")
            last = value[-1]
            if not has_text(last.content) and not last.parts and last.role != "tool":
                raise ValueError("the last message is empty; a turn needs input")
        return value

    @field_validator("chat_mode")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value is not None and not has_text(value):
            raise ValueError(f"must name a chat mode; leave it out for {DEFAULT_CHAT_MODE}")
        return value

    @property
    def input_messages(self) -> list[InputMessage]:
        """The request's messages as a list (a string is one user message)."""
        if isinstance(self.messages, str):
            return [trusted(InputMessage, role="user", content=self.messages)]  # checked as the request was
        return list(self.messages)

    @property
    def reply_budget(self) -> int | None:
        """``max_new_tokens`` if sent, else OpenAI's ``max_completion_tokens`` or ``max_tokens``."""
        for budget in (self.max_new_tokens, self.max_completion_tokens, self.max_tokens):
            if budget is not None:
                return budget
        return None

    @property
    def mode(self) -> str:
        return self.chat_mode or DEFAULT_CHAT_MODE


def parse_chat_request(data: Any) -> ChatRequest:
    """Validate ``data`` (a dict, or a ChatRequest) into a request, or raise
    :class:`InvalidRequestError` naming the first bad field."""
    if isinstance(data, ChatRequest):
        return data
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc) from exc


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict"}


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and (
        part in _UNION_TAGS or "[" in part or part.startswith(("function-", "constrained-"))
    )


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_LENGTH_ERRORS = {"too_short", "too_long"}


def _describe(tag: str) -> str:
    tag = tag.removeprefix("constrained-")
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean"}
    return names.get(tag, "a list" if tag.startswith("list[") else tag)


def _content_loc(loc: tuple[int | str, ...]) -> list[int | str]:
    """A content part's location as the client wrote it: ``content.<i>``,
    without the part type pydantic adds for the tagged union."""
    out = list(loc)
    if "parts" in out:
        k = out.index("parts")
        out[k] = "content"
        if len(out) > k + 2 and out[k + 2] in _PART_TYPES:
            del out[k + 2]
    return out


_PART_TYPES = {"text", "image_url", "input_audio", "file"}
_PATTERN_MEANS = {
    **PATTERN_MEANS,
    NOT_BLANK: "must not be empty",
    PRINTABLE_ID: NOT_PRINTABLE_ID,
}


def invalid_from_pydantic(exc: ValidationError) -> InvalidRequestError:
    """One readable error from pydantic's list: the first bad field, with the
    union branch that got furthest (a list of messages with a bad role is
    reported as that, not as "not a string")."""
    errors = exc.errors(include_url=False)
    first_field = errors[0]["loc"][:1]
    same = [e for e in errors if e["loc"][:1] == first_field]
    best = max(same, key=lambda e: len(e["loc"]))
    loc = ".".join(str(p) for p in _content_loc(best["loc"]) if not _is_tag(p))
    msg = best["msg"].removeprefix("Value error, ")
    branches = [e["loc"][1] for e in same if len(e["loc"]) == 2 and _is_tag(e["loc"][1])]
    fits = [e for e in same if e["type"] in _RANGE_ERRORS | _LENGTH_ERRORS]
    if len(same) > 1 and len(branches) == len(same) and fits:
        # The right type, out of range or length (an int 3 for a number up to 2,
        # an empty list): say that, not that the type is wrong.
        best, branches = fits[0], []
        msg = best["msg"]
    elif len(same) > 1 and len(branches) == len(same):
        msg = f"must be {' or '.join(_describe(str(b)) for b in branches)}"
    if best["type"] == "missing":
        msg = "is required"
    elif best["type"] == "too_short" and best.get("ctx", {}).get("min_length") == 1:
        msg = "must not be empty"
    elif best["type"] == "string_pattern_mismatch":
        msg = _PATTERN_MEANS.get(str(best.get("ctx", {}).get("pattern")), msg)
    elif best["type"].endswith("_type") or len(branches) > 1:
        msg = f"{msg}, got {type(best['input']).__name__}"
    return InvalidRequestError(msg, field=loc or None)


class Usage(BaseModel):
    """Token counts of a turn, counted with the model's encoding."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return trusted(
            cls,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ReplyMessage(BaseModel):
    """The reply; ``content`` is null when the model only called tools, as OpenAI sends it."""

    model_config = ConfigDict(frozen=True)
    __get_pydantic_json_schema__ = sent_always("role")

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: tuple[ToolCall, ...] | None = None


class Choice(BaseModel):
    model_config = ConfigDict(frozen=True)
    __get_pydantic_json_schema__ = sent_always("index")

    index: int = 0
    message: ReplyMessage
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """The non-streaming answer; ``conv_uid`` lets a caller continue the
    conversation, ``duplicate`` says a retried request_id was answered from
    the store, ``conversation_created`` that this turn started the
    conversation (a mistyped conv_uid shows up here), and
    ``history_matched`` how many of the request's messages the conversation
    already had (a resent history: they were not stored again); ``trim``
    says which stored messages the prompt held (:mod:`convcore.trim`)."""

    model_config = ConfigDict(frozen=True)
    __get_pydantic_json_schema__ = sent_always("object", "created")

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    conv_uid: str
    duplicate: bool = False
    conversation_created: bool = False
    history_matched: int = 0
    trim: TrimReport | None = None  # None when answered from the store

    @property
    def content(self) -> str:
        return self.choices[0].message.content or ""


class ToolCallDelta(BaseModel):
    """A streamed tool call in OpenAI's shape: ``index`` says which call of
    the reply it is. convcore sends each call whole, in one delta."""

    model_config = ConfigDict(frozen=True)
    __get_pydantic_json_schema__ = sent_always("type")

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @classmethod
    def of(cls, calls: tuple[ToolCall, ...]) -> list[ToolCallDelta]:
        return [cls(index=i, id=c.id, type=c.type, function=c.function) for i, c in enumerate(calls)]


class Delta(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    model_config = ConfigDict(frozen=True)
    __get_pydantic_json_schema__ = sent_always("index", "finish_reason")

    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed piece; the last one carries ``finish_reason`` and
    ``usage``, and :class:`ChatCompletion`'s ``conversation_created``,
    ``history_matched`` and ``trim``."""

    model_config = ConfigDict(frozen=True)
    __get_pydantic_json_schema__ = sent_always("object", "created")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    conv_uid: str
    conversation_created: bool | None = None
    history_matched: int | None = None
    trim: TrimReport | None = None
