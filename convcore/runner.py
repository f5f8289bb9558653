"""The turn runner: one way to prepare, hold and store a turn.

:class:`~convcore.engine.Engine` is a :class:`TurnRunner`; its ``chat``
(:meth:`~TurnRunner.run_turn`) and :class:`~convcore.streaming.TurnStream`
both run turns through these public steps: :meth:`~TurnRunner.check` at
the edge, then, holding the conversation when turns are serialised
(:meth:`~TurnRunner.hold`), :meth:`~TurnRunner.prepare` (the stages of
:mod:`convcore.stages`), the generation, and :meth:`~TurnRunner.append`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Literal

from .compaction import Compactor
from .content import DEFAULT_MAX_INLINE_BYTES
from .errors import ConflictError
from .generation import Generation
from .history import is_resent_history
from .locks import KeyedLocks
from .models import AppendResult, Conversation, MessageDraft, TurnRecord, TurnWrite, trusted
from .observe import annotate, span
from .protocols import ConversationStore
from .registry import ModelRegistry, ModelSpec
from .reply_budget import ReplyMeter, settle_reply
from .scenes import Scene, SceneRegistry
from .schema import ChatCompletion, ChatRequest
from .stages import (
    check_request,
    check_retry,
    choose_window,
    context_budget,
    gather_history,
    make_drafts,
    read_context,
    resolve,
)
from .tokens import count_message, get_tokenizer
from .turn import PreparedTurn, complete_turn, completion_of

__all__ = ["TurnRunner"]


class TurnRunner:
    """Runs turns over ``store`` and ``models``: the settings the stages
    follow (:class:`~convcore.stages.Settings`), a lock per serialised
    conversation, and ``clock`` to stamp stored turns. A runner reads its
    attributes as each turn starts: given another store, it uses it from
    the next turn on."""

    def __init__(
        self,
        store: ConversationStore,
        models: ModelRegistry,
        *,
        scenes: SceneRegistry | Sequence[Scene] | None = None,
        keep_first_rounds: int = 0,
        max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES,
        compaction: Compactor | None = None,
        compact: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.models = models
        self.scenes = scenes if isinstance(scenes, SceneRegistry) else SceneRegistry.of(scenes or ())
        self.keep_first_rounds = keep_first_rounds
        self.max_inline_bytes = max_inline_bytes
        self.compaction = compaction
        self.compact = compaction is not None if compact is None else compact
        self.clock = clock
        self.locks = KeyedLocks()

    def hold(self, conv_uid: str, serialize: bool) -> AbstractAsyncContextManager[object]:
        """The conversation's turn, held while a serialised turn is prepared, generated and stored."""
        return self.locks.hold(conv_uid) if serialize else nullcontext()

    def check(self, req: ChatRequest) -> ModelSpec:
        """Refuse what needs no I/O to refuse (:func:`~convcore.stages.check_request`)."""
        return check_request(req, self.scenes, self.models, self)

    async def prepare(
        self,
        req: ChatRequest,
        conv_uid: str,
        turn_id: str,
        *,
        serialize: bool,
        owned_only: bool = False,
        spec: ModelSpec | None = None,
    ) -> PreparedTurn | TurnRecord:
        """The turn ready to generate, or the stored turn a retried request
        id names. ``spec`` is :meth:`check`'s answer when it was asked already."""
        store = self.store
        if spec is None:
            spec = self.check(req)
        guess = context_budget(req, spec)
        ctx = await read_context(store, req, conv_uid, guess)
        r = await resolve(
            req, conv_uid, ctx, scenes=self.scenes, models=self.models, guess=guess, owned_only=owned_only
        )
        if isinstance(r, TurnRecord):
            await check_retry(store, r, req)
            return r
        drafts = await make_drafts(store, r)
        history = await gather_history(store, r, drafts, self)
        window, trim = await choose_window(store, r, drafts, history, self)
        req, conv, plan, spec = r.request, r.conversation, r.plan, r.spec
        temperature = req.temperature
        if temperature is None:
            temperature = (
                plan.temperature if plan.temperature is not None else spec.defaults.get("temperature")
            )
        budget_field: Literal["max_tokens", "max_completion_tokens"] = (
            "max_completion_tokens"
            if req.max_new_tokens is None and req.max_completion_tokens is not None
            else "max_tokens"
        )
        return PreparedTurn(
            request=req,
            spec=spec,
            conv_uid=conv_uid,
            turn_id=turn_id,
            system=drafts.system,
            inputs=drafts.inputs,
            store_tokenizer=r.store_tokenizer,
            encoding=r.encoding,
            window=window,
            max_new_tokens=history.frame.budget.max_new_tokens,
            temperature=None if temperature is None else float(temperature),
            params=r.params,
            budget_field=budget_field,
            expect_last_seq=_expected_last_seq(req, conv, drafts.matched, history.last_seen, serialize),
            scene=r.scene,
            scene_request=r.scene_request,
            plan=plan,
            history_matched=drafts.matched,
            trim=trim,
        )

    async def append(
        self, turn: PreparedTurn, reply: Generation, meter: ReplyMeter | None = None
    ) -> AppendResult:
        """Append the turn (its inputs and ``reply``) in one atomic write.
        ``meter``, the reply's, gives its count when it counted the same
        text in the conversation's encoding."""
        content = reply.content
        tool_calls = reply.tool_calls or None
        known = None
        if meter is not None and meter.tokenizer.name == turn.store_tokenizer.name:
            known = meter.count_of(content)
        reply_draft = trusted(
            MessageDraft,
            role="assistant",
            content=content,
            tool_calls=tool_calls,
            token_count=count_message(
                turn.store_tokenizer, "assistant", content, tool_calls=tool_calls, content_tokens=known
            ),
        )
        completion_tokens = reply.completion_tokens
        if completion_tokens is None:
            completion_tokens = (meter.count_of(content) if meter is not None else None) or get_tokenizer(
                turn.spec.encoding
            ).count(content)
        req = turn.request
        finish = reply.finish_reason
        write = trusted(
            TurnWrite,
            conv_uid=turn.conv_uid,
            turn_id=turn.turn_id,
            messages=(*turn.inputs, reply_draft),
            system=turn.system,
            encoding=turn.encoding,
            model=turn.spec.name,
            user_name=req.user_name,
            sys_code=req.sys_code,
            chat_mode=req.mode,
            chat_param=req.chat_param,
            prompt_tokens=reply.prompt_tokens or turn.window.prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish if finish in ("length", "tool_calls") else "stop",
            params=turn.sent_params or None,
            expect_last_seq=turn.expect_last_seq,
            created_at=float(self.clock()),
            owned_only=turn.scene_request.owned_only,
        )
        with span("convcore.store.append"):
            return await self.store.append_turn(write)

    async def run_turn(
        self,
        req: ChatRequest,
        conv_uid: str,
        turn_id: str,
        *,
        serialize: bool,
        owned_only: bool = False,
        conflict_retries: int = 0,
    ) -> ChatCompletion:
        """Run one turn whole: prepared, generated and stored, prepared and
        generated again (up to ``conflict_retries`` times) when a serialised
        append finds the conversation moved on."""
        spec = self.check(req)
        async with self.hold(conv_uid, serialize):
            for attempt in range(conflict_retries + 1):
                with span("convcore.prepare"):
                    turn = await self.prepare(
                        req, conv_uid, turn_id, serialize=serialize, owned_only=owned_only, spec=spec
                    )
                if isinstance(turn, TurnRecord):
                    annotate(outcome="duplicate")
                    return completion_of(turn, conv_uid, duplicate=True)
                meter = turn.reply_meter()
                gen = await complete_turn(turn, meter)
                final, cut = await turn.finish(gen.content)
                reply = settle_reply(meter, gen, gen.content, final, cut=cut)
                try:
                    result = await self.append(turn, reply, meter)
                except ConflictError:
                    if attempt == conflict_retries:
                        raise
                    continue
                if result.duplicate:
                    await check_retry(self.store, result.turn, req)  # a retry that raced its original
                record = result.turn
                annotate(
                    outcome="duplicate" if result.duplicate else "ok",
                    prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens,
                )
                return completion_of(
                    record,
                    conv_uid,
                    duplicate=result.duplicate,
                    history_matched=turn.history_matched,
                    trim=turn.trim,
                )
        raise AssertionError("unreachable")  # pragma: no cover


def _expected_last_seq(
    req: ChatRequest, conv: Conversation | None, matched: int, last_seen: int, serialize: bool
) -> int | None:
    """The last seq the turn's append must find, if any. A matched history
    holds only if nothing was appended since it was read; a history sent to
    a new conversation is stored only while the conversation is still new,
    so two first turns carrying the same history never store it twice."""
    if conv is not None and matched:
        return conv.message_count
    if (conv is None or not conv.message_count) and is_resent_history(req.input_messages):
        return 0
    return last_seen if serialize else None
