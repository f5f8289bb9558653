"""A prepared turn, and how it is generated and answered.

The turn runner (:mod:`convcore.runner`) prepares a turn (request checked,
window built), then either completes it at once or streams it; both paths
use these pieces.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from .errors import BackendError, ConvcoreError
from .generation import Generation, GenerationChunk, GenerationRequest
from .models import Message, MessageDraft, TurnRecord, trusted
from .observe import span
from .protocols import Tokenizer
from .registry import ModelSpec
from .reply_budget import ReplyMeter, metered_generation, metered_stream
from .scenes import Scene, ScenePlan, SceneRequest
from .schema import ChatCompletion, ChatRequest, Choice, ReplyMessage, Usage
from .tokens import get_tokenizer
from .trim import TrimReport
from .window import Window

__all__ = ["PreparedTurn", "bound_addition", "complete_turn", "completion_of", "created_by", "stream_turn"]


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
        return trusted(
            GenerationRequest,
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

    def reply_meter(self) -> ReplyMeter:
        """Counts the reply in the model's encoding and holds it to the budget."""
        return ReplyMeter(get_tokenizer(self.spec.encoding), self.max_new_tokens)

    async def finish(self, content: str) -> tuple[str, bool]:
        """The reply to store: what the model said, then what the scene adds,
        bounded by what is left of the reply's token budget (a query result
        can be huge), so the note that says it was cut is never cut itself;
        and whether it was cut."""
        final = await self.scene.finish(self.scene_request, self.plan, content, self.window.context_used)
        if final == content:
            return content, False
        added = final[len(content) :] if final.startswith(content) else f"\n\n{final}"
        tok = get_tokenizer(self.spec.encoding)
        # Two tokens spare: text joined at the seam may count one or two more than apart.
        room = self.max_new_tokens - tok.count(content) - 2
        bounded = bound_addition(added, room, tok, whole=self.plan.whole_addition)
        return content + bounded, bounded != added


# The longest text a token of any supported encoding stands for, with room to
# spare: enough text to fill a budget is cut off before it is tokenized.
_MAX_CHARS_PER_TOKEN = 64


def bound_addition(added: str, budget: int, tok: Tokenizer, *, whole: bool = False) -> str:
    """``added``, or its start (none of it when ``whole``) and a note that
    says it was cut, within ``budget`` tokens; with no room for the note, a
    shorter one, or nothing."""
    head = added[: max(budget, 0) * _MAX_CHARS_PER_TOKEN]
    tokens = tok.encode(head)
    if len(tokens) <= budget and len(head) == len(added):
        return added
    total = f"{len(added):,} characters"
    for note in (
        f"\n\n[truncated: this part of the reply was {total}; {budget} tokens of the reply were left for it]",
        "\n\n[truncated]",
    ):
        keep = budget - tok.count(note)
        if keep >= 0:
            return ("" if whole else tok.decode(tokens[:keep]).rstrip("\ufffd")) + note
    return ""


async def complete_turn(turn: PreparedTurn, meter: ReplyMeter) -> Generation:
    """The whole reply, within ``meter``'s budget."""
    if turn.plan.reply is not None:
        return metered_generation(Generation(content=turn.plan.reply), meter)
    with span("convcore.generate", model=turn.spec.name):
        try:
            gen = await turn.spec.backend.complete(turn.generation_request())
        except ConvcoreError:
            raise
        except Exception as exc:
            raise BackendError(f"model backend for {turn.spec.name!r} failed: {exc}") from exc
    return metered_generation(gen, meter)


def stream_turn(turn: PreparedTurn, meter: ReplyMeter) -> AsyncGenerator[GenerationChunk, None]:
    """The reply as it is generated, stopped at ``meter``'s budget."""
    reply = turn.plan.reply
    if reply is not None:
        return metered_stream(lambda: _scene_reply(reply), meter)
    return metered_stream(lambda: _observed_stream(turn), meter)


async def _observed_stream(turn: PreparedTurn) -> AsyncGenerator[GenerationChunk, None]:
    """The backend's stream inside a ``convcore.generate`` span that marks the first text."""
    with span("convcore.generate", model=turn.spec.name) as generating:
        first = True
        async with aclosing(turn.spec.backend.stream(turn.generation_request())) as chunks:
            async for chunk in chunks:
                if first and chunk.content:
                    first = False
                    generating.add_event("first_token")
                yield chunk


async def _scene_reply(reply: str) -> AsyncGenerator[GenerationChunk, None]:
    yield GenerationChunk(content=reply, finish_reason="stop")


def reply_message(reply: Message) -> ReplyMessage:
    """The stored reply as OpenAI sends it: null content when it only calls tools."""
    if reply.tool_calls:
        return trusted(ReplyMessage, content=reply.content or None, tool_calls=reply.tool_calls)
    return trusted(ReplyMessage, content=reply.content)


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
    return trusted(
        ChatCompletion,
        id=record.turn_id,
        created=int(record.created_at),
        model=record.model or "",
        choices=[trusted(Choice, message=reply_message(record.reply), finish_reason=record.finish_reason)],
        usage=Usage.of(record.prompt_tokens, record.completion_tokens),
        conv_uid=conv_uid,
        duplicate=duplicate,
        conversation_created=created_by(record),
        history_matched=history_matched,
        trim=None if duplicate else trim,
    )
