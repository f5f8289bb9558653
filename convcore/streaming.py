"""Streaming one turn: the chunks, and what is stored when the consumer leaves.

The first chunk goes out with the backend's first piece of the reply, so a
backend failing before that fails the first step, not a started reply; the
reply is held to its budget (``reply_budget.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from .errors import BackendError, ConflictError, ConvcoreError
from .generation import GenerationChunk
from .models import TurnRecord
from .observe import annotate, span
from .registry import ModelSpec
from .reply_budget import ReplyMeter, settle_reply
from .runner import TurnRunner
from .schema import ChatCompletionChunk, ChatRequest, ChunkChoice, Delta, ToolCallDelta, Usage
from .stages import check_retry
from .trim import TrimReport
from .turn import PreparedTurn, created_by, stream_turn

__all__ = ["TurnStream"]


class TurnStream:
    """The chunks of one streamed turn; iterate once, or ``aclose()``.

    ``first`` is the turn as :meth:`TurnRunner.prepare` gave it; None for a
    serialised turn, prepared once on the first step, holding the
    conversation (its ``model``, ``history_matched``, ``trim`` and
    ``conversation_created`` are known from the first chunk on).
    """

    def __init__(
        self,
        runner: TurnRunner,
        request: ChatRequest,
        conv_uid: str,
        turn_id: str,
        *,
        serialize: bool,
        first: PreparedTurn | TurnRecord | None,
        spec: ModelSpec | None = None,
        owned_only: bool = False,
    ) -> None:
        self.runner = runner
        self.owned_only = owned_only
        self.request = request
        self.conv_uid = conv_uid
        self.id = turn_id
        self.model = spec.name if spec is not None else ""
        # Known before the first chunk (for headers); the last chunk says it again, as stored.
        self.history_matched = 0
        self.trim: TrimReport | None = None
        self.conversation_created = False
        self._serialize = serialize
        self._spec = spec
        self._first = first
        if first is not None:
            self._prepared(first)
        self._gen = self._run()

    def _prepared(self, turn: PreparedTurn | TurnRecord) -> None:
        if isinstance(turn, TurnRecord):
            self.model = turn.model or ""
            self.conversation_created = created_by(turn)
        else:
            self.model = turn.spec.name
            self.history_matched, self.trim = turn.history_matched, turn.trim
            self.conversation_created = turn.scene_request.conversation is None

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    def _chunk(
        self, delta: Delta, finish: str | None = None, usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            usage=usage,
            conv_uid=self.conv_uid,
        )

    def _last_chunk(self, record: TurnRecord) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            model=self.model,
            choices=[ChunkChoice(delta=Delta(), finish_reason=record.finish_reason)],
            usage=Usage.of(record.prompt_tokens, record.completion_tokens),
            conv_uid=self.conv_uid,
            conversation_created=created_by(record),
            history_matched=self.history_matched,
            trim=self.trim,
        )

    async def _run(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        runner = self.runner
        async with runner.hold(self.conv_uid, self._serialize):
            turn = self._first
            if turn is None:
                # Serialised: prepared once the previous turn is stored, so it sees that turn.
                with span("convcore.prepare"):
                    turn = await runner.prepare(
                        self.request,
                        self.conv_uid,
                        self.id,
                        serialize=self._serialize,
                        owned_only=self.owned_only,
                        spec=self._spec,
                    )
                self._prepared(turn)
            if isinstance(turn, TurnRecord):
                annotate(outcome="duplicate")
                async for chunk in self._replay(turn):
                    yield chunk
                return
            parts: list[str] = []
            last: GenerationChunk | None = None
            started = False
            meter = turn.reply_meter()
            async with aclosing(stream_turn(turn, meter)) as chunks:
                try:
                    async for piece in chunks:
                        if not started:
                            # Only now has the backend answered: until here a
                            # failure can still be told as an error, not a reply.
                            started = True
                            yield self._chunk(Delta(role="assistant", content=""))
                        if piece.finish_reason is not None:
                            # The last piece's text is sent after the turn is
                            # stored: a consumer that leaves on it has seen a
                            # finished reply, so the turn must be kept.
                            last = piece
                            break
                        if piece.content:
                            parts.append(piece.content)
                            yield self._chunk(Delta(content=piece.content))
                except ConvcoreError:
                    raise
                except Exception as exc:
                    raise BackendError(f"model backend for {turn.spec.name!r} failed: {exc}") from exc
            if last is None:
                raise BackendError(f"model backend for {turn.spec.name!r} ended without a finish_reason")
            streamed = "".join(parts)
            # Generation is done: finish and store it even if our consumer is
            # cancelled now, and keep the conversation's lock until it is stored.
            work = asyncio.ensure_future(self._finish_and_store(turn, streamed + last.content, last, meter))
            try:
                content, record = await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait([work])
                raise
            annotate(
                outcome="ok", prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens
            )
            if len(content) > len(streamed):
                yield self._chunk(Delta(content=content[len(streamed) :]))
            if record.reply.tool_calls:
                yield self._chunk(Delta(tool_calls=ToolCallDelta.of(record.reply.tool_calls)))
            yield self._last_chunk(record)

    async def _finish_and_store(
        self, turn: PreparedTurn, generated: str, last: GenerationChunk, meter: ReplyMeter
    ) -> tuple[str, TurnRecord]:
        """The scene's final reply, stored; what is stored starts with what
        was generated (a scene may only add to a streamed reply; anything
        else follows it), within the reply budget."""
        final, cut = await turn.finish(generated)
        content = final if final.startswith(generated) else f"{generated}\n\n{final}"
        reply = settle_reply(meter, last, generated, content, cut=cut)
        result = await self.runner.append(turn, reply, meter)
        if result.duplicate:
            # Our request id was stored by a request that raced this one. Its
            # text went out already, so it may only end well if it is what was kept.
            await check_retry(self.runner.store, result.turn, self.request)
            if result.turn.reply.content != reply.content:
                raise ConflictError(
                    f"request_id {self.id!r} was answered by a concurrent request with another reply, "
                    "which is the one stored; read the conversation for it"
                )
        return reply.content, result.turn

    async def _replay(self, record: TurnRecord) -> AsyncIterator[ChatCompletionChunk]:
        self.trim = None  # answered from the store: no window was built
        yield self._chunk(Delta(role="assistant", content=""))
        if record.reply.content or not record.reply.tool_calls:
            yield self._chunk(Delta(content=record.reply.content))
        if record.reply.tool_calls:
            yield self._chunk(Delta(tool_calls=ToolCallDelta.of(record.reply.tool_calls)))
        yield self._last_chunk(record)
