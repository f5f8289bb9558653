"""OpenAI's chat-completions parameters: each is passed on or refused, never dropped.

Every parameter of OpenAI's request body is a field here. Those in
:data:`PASS_THROUGH` go to the model backend as sent, if the backend says it
supports them (``ModelBackend.supported_params``) and the chat mode lets
them through; otherwise the turn is refused, naming the parameter. The rest
convcore answers itself: it keeps one text reply per turn, so ``n`` must be
1, ``logprobs``/``top_logprobs`` and audio output are refused, and
``stream_options`` and ``max_completion_tokens`` shape its own reply.

A supported-parameter entry ``"name:kind"`` allows only values whose
``type`` is ``kind`` (``"response_format:json_object"``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from .errors import InvalidRequestError

__all__ = [
    "NEUTRAL",
    "PASS_THROUGH",
    "JSONInt",
    "NonNegativeInt",
    "OpenAIParams",
    "PositiveInt",
    "Temperature",
    "Unit",
    "check_supported",
    "integral",
    "validate_defaults",
]

# Passed to the backend as sent (when supported).
PASS_THROUGH: tuple[str, ...] = (
    "stop",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "logit_bias",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "reasoning_effort",
    "verbosity",
    "service_tier",
    "metadata",
    "store",
    "modalities",
    "prediction",
    "web_search_options",
)


def integral(value: Any) -> Any:
    """``value``, an integral float as the int it is (a BeforeValidator)."""
    # JSON has one number type: 3.0 is the integer 3, as JSON Schema's "integer" says.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON means it: 3 or 3.0, never "3" or true. (Bounds go
# before the BeforeValidator, so the JSON schema says them as minimum/maximum.)
JSONInt = Annotated[int, Strict(), BeforeValidator(integral)]
PositiveInt = Annotated[int, Strict(), Field(ge=1), BeforeValidator(integral)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0), BeforeValidator(integral)]
_Bias = Annotated[int, Strict(), Field(ge=-100, le=100), BeforeValidator(integral)]

# A bounded JSON number, int or float as sent. (Bounds on each branch: on the
# union they would reach the JSON schema as pydantic's ge/le, not its minimum/maximum.)
Unit = Annotated[StrictFloat, Field(ge=0, le=1)] | Annotated[StrictInt, Field(ge=0, le=1)]
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)] | Annotated[StrictInt, Field(ge=0, le=2)]
_Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)] | Annotated[StrictInt, Field(ge=-2, le=2)]
_Object = dict[StrictStr, Any]
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# What the validators below allow, as JSON Schema (pydantic cannot say it).
_RESPONSE_FORMAT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"type": {"enum": list(_RESPONSE_FORMATS)}},
            "required": ["type"],
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {"properties": {"json_schema": {"type": "object"}}, "required": ["json_schema"]},
        },
        {"type": "null"},
    ]
}

_ONE = {
    "anyOf": [{"const": 1}, {"type": "null"}],
    "description": "1: a conversation keeps one reply per turn",
}
_FALSE = {"anyOf": [{"const": False}, {"type": "null"}], "description": "log probabilities are not returned"}
_ZERO = {"anyOf": [{"const": 0}, {"type": "null"}], "description": "log probabilities are not returned"}
_TEXT_ONLY = {"anyOf": [{"type": "array", "items": {"const": "text"}}, {"type": "null"}]}
_STREAM_OPTIONS = {
    "anyOf": [{"type": "object", "properties": {"include_usage": {"type": "boolean"}}}, {"type": "null"}]
}


class OpenAIParams(BaseModel):
    """The parameters, checked for shape; None means the request is silent."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    stop: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=4)] | None = None
    top_p: Unit | None = None
    seed: JSONInt | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    response_format: Annotated[_Object | None, WithJsonSchema(_RESPONSE_FORMAT_SCHEMA)] = None
    logit_bias: dict[StrictStr, _Bias] | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    tools: list[_Object] | None = None
    tool_choice: StrictStr | _Object | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[_Object] | None = None
    function_call: StrictStr | _Object | None = None
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None
    service_tier: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    store: StrictBool | None = None
    modalities: Annotated[list[Literal["text", "audio"]] | None, WithJsonSchema(_TEXT_ONLY)] = None
    prediction: _Object | None = None
    web_search_options: _Object | None = None
    # Answered by convcore itself, never passed on.
    max_completion_tokens: PositiveInt | None = None
    n: Annotated[JSONInt | None, WithJsonSchema(_ONE)] = None
    logprobs: Annotated[StrictBool | None, WithJsonSchema(_FALSE)] = None
    top_logprobs: Annotated[JSONInt | None, WithJsonSchema(_ZERO)] = None
    audio: Annotated[_Object | None, WithJsonSchema({"type": "null"})] = None
    stream_options: Annotated[_Object | None, WithJsonSchema(_STREAM_OPTIONS)] = None

    @field_validator("response_format")
    @classmethod
    def _format_type(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in _RESPONSE_FORMATS:
            raise ValueError(f"type must be one of {', '.join(_RESPONSE_FORMATS)}")
        if (
            value is not None
            and value["type"] == "json_schema"
            and not isinstance(value.get("json_schema"), dict)
        ):
            raise ValueError("type json_schema needs a json_schema object")
        return value

    @field_validator("n")
    @classmethod
    def _one_reply(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("must be 1: a conversation keeps one reply per turn")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("is not supported: replies are returned without log probabilities")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "audio" in value:
            raise ValueError("may only ask for text: a conversation keeps text replies")
        return value

    @field_validator("audio")
    @classmethod
    def _no_audio_out(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("audio output is not supported: a conversation keeps text replies")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and not isinstance(value.get("include_usage", False), bool):
            raise ValueError("include_usage must be a boolean")
        return value

    def generation_params(self) -> dict[str, Any]:
        """The pass-through parameters the request sets, as sent."""
        given = self.model_fields_set  # a parameter not given holds its default, None
        if given.isdisjoint(PASS_THROUGH):
            return {}
        return {name: value for name in PASS_THROUGH if (value := getattr(self, name)) is not None}


def check_supported(params: Mapping[str, Any], supported: Collection[str], where: str) -> dict[str, Any]:
    """The parameters to send where ``supported`` is what is honoured:
    refuses the first one it does not allow, naming it and ``where`` (the
    model, or the chat mode). A value that asks for nothing (a penalty of
    0, ``top_p`` 1: OpenAI's own defaults, which DB-GPT's client always
    sends) is honoured by any model, so it is left out, not refused."""
    sent: dict[str, Any] = {}
    for name, value in params.items():
        kind = value.get("type") if isinstance(value, dict) else None
        if name in supported or (kind is not None and f"{name}:{kind}" in supported):
            sent[name] = value
        elif name not in NEUTRAL or NEUTRAL[name] != value:
            what = f"{name} of type {kind!r}" if kind is not None and _allows_some(name, supported) else name
            raise InvalidRequestError(
                f"{where} cannot honour {what}; leave it out or use another model", field=name
            )
    return sent


# Values that ask for nothing: any model honours them (they are not sent).
NEUTRAL: dict[str, Any] = {"presence_penalty": 0, "frequency_penalty": 0, "top_p": 1, "logit_bias": {}}


def _allows_some(name: str, supported: Collection[str]) -> bool:
    return any(s.startswith(f"{name}:") for s in supported)


def validate_defaults(defaults: Mapping[str, Any], field: str) -> dict[str, Any]:
    """A model's configured defaults, checked like a request's parameters
    (``temperature`` included); an unknown name is an error."""
    names = {*PASS_THROUGH, "temperature"}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise InvalidRequestError(f"unknown parameter(s) {unknown}", field=f"{field}.{unknown[0]}")
    temperature = defaults.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise InvalidRequestError("must be a number from 0 to 2", field=f"{field}.temperature")
    try:
        params = OpenAIParams.model_validate({k: v for k, v in defaults.items() if k != "temperature"})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in error["loc"][:1])
        raise InvalidRequestError(
            error["msg"].removeprefix("Value error, "), field=f"{field}.{loc}"
        ) from None
    out = params.generation_params()
    if temperature is not None:
        out["temperature"] = float(temperature)
    return out
