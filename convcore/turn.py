"""A prepared turn, and how it is generated and answered.

The engine prepares a turn (request checked, window built), then either
completes it at once or streams it; both paths use these pieces.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from .errors import BackendError, ConvcoreError
from .generation import Generation, GenerationChunk, GenerationRequest
from .models import Message, MessageDraft, TurnRecord
from .protocols import Tokenizer
from .registry import ModelSpec
from .scenes import Scene, ScenePlan, SceneRequest
from .schema import ChatCompletion, ChatRequest, Choice, ReplyMessage, Usage
from .trim import TrimReport
from .window import Window

__all__ = ["PreparedTurn", "complete_turn", "completion_of", "created_by", "stream_turn"]


@dataclass(frozen=True)
class PreparedTurn:
    """A prepared turn: everything needed to generate and then store it."""

    request: ChatRequest
    spec: ModelSpec
    conv_uid: str
    turn_id: str
    system: tuple[MessageDraft, ...] | None
    inputs: tuple[MessageDraft, ...]
    store_tokenizer: Tokenizer
    encoding: str
    window: Window
    max_new_tokens: int
    temperature: float | None
    params: dict[str, Any]
    budget_field: Literal["max_tokens", "max_completion_tokens"]
    expect_last_seq: int | None
    scene: Scene
    scene_request: SceneRequest
    plan: ScenePlan
    history_matched: int = 0  # request messages the conversation already had
    trim: TrimReport | None = None

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(
            model=self.spec.upstream,
            messages=self.window.messages,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            conv_uid=self.conv_uid,
            request_id=self.turn_id,
            params=self.params,
            budget_field=self.budget_field,
        )

    @property
    def sent_params(self) -> dict[str, Any]:
        """What shaped the reply, as stored with the turn: the parameters
        sent and the temperature."""
        if self.temperature is None:
            return dict(self.params)
        return {**self.params, "temperature": self.temperature}

    async def finish(self, content: str) -> str:
        """The reply to store: the scene may add to what the model said."""
        return await self.scene.finish(self.scene_request, self.plan, content, self.window.context_used)


async def complete_turn(turn: PreparedTurn) -> Generation:
    if turn.plan.reply is not None:
        return Generation(content=turn.plan.reply)
    try:
        return await turn.spec.backend.complete(turn.generation_request())
    except ConvcoreError:
        raise
    except Exception as exc:
        raise BackendError(f"model backend for {turn.spec.name!r} failed: {exc}") from exc


async def stream_turn(turn: PreparedTurn) -> AsyncGenerator[GenerationChunk, None]:
    if turn.plan.reply is not None:
        yield GenerationChunk(content=turn.plan.reply, finish_reason="stop")
        return
    async with aclosing(turn.spec.backend.stream(turn.generation_request())) as chunks:
        async for chunk in chunks:
            yield chunk


def reply_message(reply: Message) -> ReplyMessage:
    """The stored reply as OpenAI sends it: null content when it only calls tools."""
    if reply.tool_calls:
        return ReplyMessage(content=reply.content or None, tool_calls=reply.tool_calls)
    return ReplyMessage(content=reply.content)


def created_by(record: TurnRecord) -> bool:
    """Whether this turn started its conversation: it holds seq 1."""
    return record.messages[0].seq == 1


def completion_of(
    record: TurnRecord,
    conv_uid: str,
    *,
    duplicate: bool,
    history_matched: int = 0,
    trim: TrimReport | None = None,
) -> ChatCompletion:
    return ChatCompletion(
        id=record.turn_id,
        created=int(record.created_at),
        model=record.model or "",
        choices=[Choice(message=reply_message(record.reply), finish_reason=record.finish_reason)],
        usage=Usage.of(record.prompt_tokens, record.completion_tokens),
        conv_uid=conv_uid,
        duplicate=duplicate,
        conversation_created=created_by(record),
        history_matched=history_matched,
        trim=None if duplicate else trim,
    )
