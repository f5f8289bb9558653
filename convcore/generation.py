"""What the engine asks of a model backend, and what comes back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .models import FinishReason, PromptMessage, ToolCall

__all__ = ["Generation", "GenerationChunk", "GenerationRequest", "PromptMessage"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class GenerationRequest(BaseModel):
    """One generation: the windowed prompt and the reply budget.

    ``model`` is the registry's name; a backend maps it to its upstream name.
    ``params`` are OpenAI's parameters for this turn (the request's, else the
    model's configured defaults), only names the backend declares in
    ``supported_params``; a backend sends them as they are. ``budget_field``
    is the name the client gave the reply budget (OpenAI's reasoning models
    take only ``max_completion_tokens``). ``purpose`` is ``summary`` when
    compaction asks for a summary of earlier messages rather than a reply
    (a backend may treat it differently).
    """

    model_config = _FROZEN

    model: str
    messages: tuple[PromptMessage, ...] = Field(min_length=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float | None = None
    conv_uid: str | None = None
    request_id: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    budget_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    purpose: Literal["reply", "summary"] = "reply"


class Generation(BaseModel):
    """A whole reply. Token counts are the backend's own where it reports
    them. ``tool_calls`` are the tools the model asked to call."""

    model_config = _FROZEN

    content: str
    finish_reason: FinishReason = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: tuple[ToolCall, ...] | None = None


class GenerationChunk(BaseModel):
    """A streamed piece of a reply; the last one has ``finish_reason`` set,
    and the reply's ``tool_calls``, whole, if the model called tools."""

    model_config = _FROZEN

    content: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
