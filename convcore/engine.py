"""The conversation engine: one turn in, one reply out, history kept.

A turn is prepared (request checked, window built within the budget),
generated, then appended to the store in one atomic write. Nothing is stored
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

import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from typing import Any, TypeVar

from .compaction import Compactor, Summary, summary_message
from .content import DEFAULT_MAX_INLINE_BYTES, check_inline_sizes
from .errors import (
    ConflictError,
    ContextOverflowError,
    ConversationNotFoundError,
    InvalidRequestError,
    PermissionDeniedError,
    shown,
)
from .fork import fork_conversation
from .generation import Generation, GenerationChunk
from .history import is_resent_history, match_history
from .locks import KeyedLocks
from .models import (
    INSTRUCTION_ROLES,
    AppendResult,
    Conversation,
    Message,
    MessageDraft,
    PromptMessage,
    TurnContext,
    TurnRecord,
    TurnWrite,
)
from .observe import annotate, span
from .params import check_supported
from .protocols import ConversationStore, Tokenizer
from .registry import ModelRegistry, ModelSpec, supported_params
from .reply_budget import settle_reply
from .scenes import Scene, SceneRegistry, SceneRequest
from .schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    InputMessage,
    parse_chat_request,
)
from .streaming import TurnStream
from .tokens import REPLY_PRIMING_TOKENS, count_message, count_prompt_message, get_tokenizer
from .toolcalls import check_tool_sequence, pending_tool_calls
from .trim import trim_report
from .turn import PreparedTurn, complete_turn, completion_of
from .window import Budget, Window, build_window, fit_oldest_rounds, mark_rounds

__all__ = ["Engine", "TurnStream"]

_CONV_NAMESPACE = uuid.UUID("6f1c1a52-3d0e-4c38-9a53-2b8f4f3c0d11")
_HEAD_PAGE = 64
# The largest offset, limit or start_seq accepted: every store's integers
# (int64 columns, Redis' Lua doubles) hold it plus a page with room to spare.
MAX_INDEX = 2**48


class Engine:
    """Multi-turn chat over a store and a model registry.

    The engine does not own ``store`` or the backends unless ``owned=True``
    (then :meth:`aclose` closes them). ``max_inline_bytes`` bounds each data
    URL or base64 payload in a message's content parts.
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
        self.store = store
        self.models = models
        self.serialize = serialize
        self.keep_first_rounds = keep_first_rounds
        self.conflict_retries = conflict_retries
        self.scenes = scenes if isinstance(scenes, SceneRegistry) else SceneRegistry.of(scenes or ())
        self.max_inline_bytes = max_inline_bytes
        self._clock = clock
        self._owned = owned
        self._locks = KeyedLocks()
        self.compaction = compaction
        self.compact = compaction is not None if compact is None else compact

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
        serialize = self._serialize(req)
        async with self._lock(conv_uid, serialize):
            for attempt in range(self.conflict_retries + 1):
                with span("convcore.prepare"):
                    turn = await self._prepare(req, conv_uid, turn_id, serialize, owned_only)
                if isinstance(turn, TurnRecord):
                    annotate(outcome="duplicate")
                    return completion_of(turn, conv_uid, duplicate=True)
                meter = turn.reply_meter()
                gen = await complete_turn(turn, meter)
                reply = settle_reply(meter, gen, gen.content, await turn.finish(gen.content))
                try:
                    result = await self._append(turn, reply.content, reply.finish_reason, reply)
                except ConflictError:
                    if attempt == self.conflict_retries:
                        raise
                    continue
                if result.duplicate:
                    _check_same_request(result.turn, req)  # a retry that raced its original
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

    async def open_stream(
        self, request: ChatRequest | dict[str, Any], *, owned_only: bool = False
    ) -> TurnStream:
        """Check the request and build its window now, so bad input fails
        here rather than mid-stream; iterate the result for the chunks."""
        req = parse_chat_request(request)
        conv_uid, turn_id = self._ids(req)
        serialize = self._serialize(req)
        with span("convcore.prepare"):
            first = await self._prepare(req, conv_uid, turn_id, serialize, owned_only)
        return TurnStream(self, req, conv_uid, turn_id, serialize, first, owned_only=owned_only)

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
        _check_owner(conv, user_name, sys_code, owned_only)
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
                self.store, source, up_to_seq, new_conv_uid=new_conv_uid, now=self._clock
            )
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
        turn_id = req.request_id or uuid.uuid4().hex
        if req.conv_uid:
            return req.conv_uid, turn_id
        if req.request_id:
            # A retried first turn must land in the same new conversation; the
            # owner is part of the name, so another caller reusing the id
            # starts a conversation of its own instead of seeing this one.
            owner = f"{req.user_name or ''}\x00{req.sys_code or ''}\x00{req.request_id}"
            return uuid.uuid5(_CONV_NAMESPACE, owner).hex, turn_id
        return uuid.uuid4().hex, turn_id

    def _serialize(self, req: ChatRequest) -> bool:
        return self.serialize if req.serialize is None else req.serialize

    def _lock(self, conv_uid: str, serialize: bool) -> AbstractAsyncContextManager[object]:
        return self._locks.hold(conv_uid) if serialize else nullcontext()

    async def _prepare(
        self, req: ChatRequest, conv_uid: str, turn_id: str, serialize: bool, owned_only: bool = False
    ) -> PreparedTurn | TurnRecord:
        annotate(span_id=req.span_id)  # the caller's trace id, for its logs and spans
        if req.chat_mode is not None:
            self.scenes.get(req)  # an unknown mode fails before any I/O
        annotate(chat_mode=req.mode)  # a known one only: metrics label turns by it
        first_spec = self.models.get(req.model)  # an unknown model fails before any I/O too
        compacting = self._compacting(req)
        for i, m in enumerate(req.input_messages):
            if m.parts:
                check_inline_sizes(m.parts, self.max_inline_bytes, f"messages.{i}.content")
        # One read brings the conversation, a retried turn and the newest
        # messages the window could possibly use (an upper bound: system
        # prompt and input only shrink it; build_window trims to the exact room).
        guess = first_spec.context_window - (req.reply_budget or first_spec.max_new_tokens)
        if req.conv_uid is None and req.request_id is None:
            ctx = TurnContext(conversation=None)  # a conv_uid minted just now cannot exist yet
        else:
            with span("convcore.store.read"):
                ctx = await self.store.read_context(conv_uid, max(guess, 0), turn_id=req.request_id)
        conv = ctx.conversation
        if conv is None and req.require_existing and ctx.turn is None:
            raise ConversationNotFoundError(conv_uid)
        if conv is not None:
            _check_owner(conv, req.user_name, req.sys_code, owned_only)
            if req.chat_mode is None and conv.chat_mode in self.scenes:
                # Continuing by conv_uid keeps the conversation's mode and its parameter.
                req = req.model_copy(
                    update={"chat_mode": conv.chat_mode, "chat_param": req.chat_param or conv.chat_param}
                )
        annotate(chat_mode=req.mode)
        if ctx.turn is not None:
            _check_same_request(ctx.turn, req)
            return ctx.turn
        scene = self.scenes.get(req)
        scene_request = SceneRequest(
            request=req, conversation=conv, models=self.models, owned_only=owned_only
        )
        plan = await scene.prepare(scene_request)
        kept_model = conv.model if conv is not None and conv.model in self.models else None
        spec = self.models.get(req.model or plan.model or kept_model)
        annotate(model=spec.name)
        tok = get_tokenizer(spec.encoding)
        encoding = conv.encoding if conv is not None else spec.encoding
        store_tok = tok if encoding == spec.encoding else get_tokenizer(encoding)

        params = _turn_params(req, spec, scene)
        given = req.input_messages
        matched = 0
        if conv is not None and conv.message_count and is_resent_history(given):
            logged = [i for i, m in enumerate(given) if m.role not in INSTRUCTION_ROLES]
            known = await self.store.read_messages(conv_uid, limit=min(len(logged), conv.message_count))
            matched = match_history(given, known, conv.message_count)
            check_tool_sequence(given)  # the whole history, from its start
            dropped = set(logged[:matched])
            given = [m for i, m in enumerate(given) if i not in dropped]
        else:
            stored_last = await self._last_message(conv_uid, conv, ctx.tail)
            check_tool_sequence(given, pending_tool_calls(stored_last), continuing=stored_last is not None)
        system_in = [m for m in given if m.role in INSTRUCTION_ROLES]
        others = [m for m in given if m.role not in INSTRUCTION_ROLES]
        marks = mark_rounds([m.role for m in others])
        inputs = tuple(
            MessageDraft(
                role=m.role,
                content=m.content,
                name=m.name,
                tool_call_id=m.tool_call_id,
                tool_calls=m.tool_calls,
                parts=m.parts,
                token_count=count_prompt_message(store_tok, m),
                starts_round=mark,
            )
            for m, mark in zip(others, marks, strict=True)
        )
        system = (
            tuple(
                MessageDraft(
                    role=m.role,
                    content=m.content,
                    name=m.name,
                    token_count=count_message(store_tok, m.role, m.content, m.name),
                )
                for m in system_in
            )
            if system_in
            else None
        )
        max_new = req.reply_budget or plan.max_new_tokens or spec.max_new_tokens
        budget = Budget(model=spec.name, context_window=spec.context_window, max_new_tokens=max_new)
        recount = store_tok is not tok
        prompt_system = _as_role(
            [
                *_scene_messages(tok, [plan.system_prompt] if plan.system_prompt else []),
                *_recounted(system if system is not None else (conv.system if conv else ()), tok, recount),
            ],
            spec.instruction_role,
            tok,
        )
        prompt_inputs = _recounted(inputs, tok, recount)
        fit = functools.partial(
            build_window,
            budget=budget,
            system=prompt_system,
            new_input=prompt_inputs,
            context=_as_role(_scene_messages(tok, plan.context), spec.instruction_role, tok),
            context_share=plan.max_context_share,
        )

        head: list[Message] = []
        tail: list[Message] = []
        open_round: list[Message] = []
        last_seen = conv.message_count if conv else 0
        if conv is not None and conv.message_count and inputs and not inputs[0].starts_round:
            # Tool results continue the stored round of the calls they answer:
            # that round goes into the prompt whole, with them.
            open_round = _recounted(_open_round(ctx.tail, conv, budget, prompt_system, inputs), tok, recount)
            fit = functools.partial(fit, open_round=open_round)
        open_start = open_round[0].seq if open_round else last_seen + 1
        if conv is not None and open_start > 1:
            # An empty-history window fixes the overflow check and the room left.
            room = budget.prompt_limit - fit(head=(), tail=()).prompt_tokens
            keep = _first_set(req.keep_first_rounds, plan.keep_first_rounds, self.keep_first_rounds)
            if keep and room > 0:
                head = await self._read_head(conv_uid, keep, room, tok, recount)
                head = fit_oldest_rounds([m for m in head if m.seq < open_start], room)
                room -= sum(m.token_count for m in head)
            if room > 0:
                tail = list(ctx.tail)
                if recount:
                    tail = await self._read_recounted_tail(conv_uid, room, conv.message_count, tok)
                elif room > guess and len(tail) < conv.message_count:
                    tail = await self.store.read_tail(conv_uid, room)  # a scene widened the room
                last_seen = max(last_seen, tail[-1].seq if tail else 0)
                head_end = head[-1].seq if head else 0
                tail = [m for m in tail if head_end < m.seq < open_start]
        window = fit(head=head, tail=tail)
        summary = None
        if conv is not None and compacting:
            window, summary = await self._summarised(conv_uid, spec, tok, window, fit, head, tail, last_seen)
        trim = trim_report(
            chosen=window.chosen,
            prompt_tokens=window.prompt_tokens,
            history_messages=last_seen,
            history_total_tokens=conv.total_tokens if conv else 0,
            same_encoding=not recount,
            inputs=len(inputs),
            summarized=(summary.first, summary.last) if summary else None,
            summarized_tokens=summary.covered_tokens if summary else 0,
            context_window=budget.context_window,
            max_new_tokens=budget.max_new_tokens,
        )
        temperature = _first_set(req.temperature, plan.temperature, spec.defaults.get("temperature"))
        return PreparedTurn(
            request=req,
            spec=spec,
            conv_uid=conv_uid,
            turn_id=turn_id,
            system=system,
            inputs=inputs,
            store_tokenizer=store_tok,
            encoding=encoding,
            window=window,
            max_new_tokens=max_new,
            temperature=None if temperature is None else float(temperature),
            params=params,
            budget_field="max_completion_tokens"
            if req.max_new_tokens is None and req.max_completion_tokens is not None
            else "max_tokens",
            # A matched history holds only if nothing was appended since it was read.
            expect_last_seq=conv.message_count if conv and matched else last_seen if serialize else None,
            scene=scene,
            scene_request=scene_request,
            plan=plan,
            history_matched=matched,
            trim=trim,
        )

    def _compacting(self, req: ChatRequest) -> bool:
        if req.compact and self.compaction is None:
            raise InvalidRequestError("this engine has no compaction configured", field="compact")
        return self.compaction is not None and (self.compact if req.compact is None else req.compact)

    async def _summarised(
        self,
        conv_uid: str,
        spec: ModelSpec,
        tok: Tokenizer,
        window: Window,
        fit: Callable[..., Window],
        head: Sequence[Message],
        tail: Sequence[Message],
        last_seen: int,
    ) -> tuple[Window, Summary | None]:
        """The window with a summary of the rounds it dropped, when one
        exists (or is due) and fits its share; else the window as it was."""
        compactor = self.compaction
        if compactor is None:
            return window, None
        kept = sorted(m.seq for m in window.chosen if isinstance(m, Message))
        head_end = 0
        while head_end < len(kept) and kept[head_end] == head_end + 1:
            head_end += 1
        end = (kept[head_end] if head_end < len(kept) else last_seen + 1) - 1
        if end < head_end + 1:
            return window, None  # nothing dropped
        summary = await compactor.summary_for(self.store, spec, conv_uid, head_end + 1, end)
        if summary is None:
            return window, None
        with_summary = fit(
            head=head,
            tail=tail,
            summary=summary_message(summary, tok),
            summary_share=compactor.share,
        )
        return (with_summary, summary) if with_summary.summary_used else (window, None)

    async def _last_message(
        self, conv_uid: str, conv: Conversation | None, tail: Sequence[Message]
    ) -> Message | None:
        """The conversation's newest stored message (None for a new one)."""
        if conv is None or not conv.message_count:
            return None
        if tail and tail[-1].seq == conv.message_count:
            return tail[-1]
        newest = await self.store.read_messages(conv_uid, start_seq=conv.message_count, limit=1)
        return newest[-1] if newest else None

    async def _read_head(
        self, conv_uid: str, rounds: int, room: int, tok: Tokenizer, recount: bool
    ) -> list[Message]:
        """The first ``rounds`` whole rounds, counted in ``tok``'s encoding,
        reading no further than they could fit in ``room``."""
        head: list[Message] = []
        started = 0
        used = 0
        round_start = 0
        seq = 1
        while True:
            page = await self.store.read_messages(conv_uid, start_seq=seq, limit=_HEAD_PAGE)
            for m in _recounted(page, tok, recount):
                if m.starts_round:
                    started += 1
                    round_start = len(head)
                used += m.token_count
                if started > rounds:
                    return head
                if used > room:
                    return head[:round_start]  # this round cannot fit whole
                head.append(m)
            if len(page) < _HEAD_PAGE:
                return head
            seq = page[-1].seq + 1

    async def _read_recounted_tail(
        self, conv_uid: str, room: int, message_count: int, tok: Tokenizer
    ) -> list[Message]:
        """The newest messages holding at least ``room`` tokens in ``tok``'s
        encoding (or all of them), when they were counted in another one:
        read by stored counts, recount, and read twice as far until covered."""
        budget = room
        while True:
            tail = _recounted(await self.store.read_tail(conv_uid, budget), tok, True)
            if sum(m.token_count for m in tail) > room or len(tail) >= message_count:
                return tail
            budget *= 2

    async def _append(
        self, turn: PreparedTurn, content: str, finish_reason: str, usage: Generation | GenerationChunk
    ) -> AppendResult:
        tool_calls = usage.tool_calls or None
        reply = MessageDraft(
            role="assistant",
            content=content,
            tool_calls=tool_calls,
            token_count=count_message(turn.store_tokenizer, "assistant", content, tool_calls=tool_calls),
        )
        completion_tokens = usage.completion_tokens
        if completion_tokens is None:
            completion_tokens = get_tokenizer(turn.spec.encoding).count(content)
        req = turn.request
        write = TurnWrite(
            conv_uid=turn.conv_uid,
            turn_id=turn.turn_id,
            messages=(*turn.inputs, reply),
            system=turn.system,
            encoding=turn.encoding,
            model=turn.spec.name,
            user_name=req.user_name,
            sys_code=req.sys_code,
            chat_mode=req.mode,
            chat_param=req.chat_param,
            prompt_tokens=usage.prompt_tokens or turn.window.prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason if finish_reason in ("length", "tool_calls") else "stop",
            params=turn.sent_params or None,
            expect_last_seq=turn.expect_last_seq,
            created_at=self._clock(),
        )
        with span("convcore.store.append"):
            return await self.store.append_turn(write)


def _scene_messages(tok: Tokenizer, texts: Sequence[str]) -> list[MessageDraft]:
    return [
        MessageDraft(role="system", content=t, token_count=count_message(tok, "system", t)) for t in texts
    ]


def _open_round(
    tail: Sequence[Message],
    conv: Conversation,
    budget: Budget,
    system: Sequence[MessageDraft],
    inputs: Sequence[MessageDraft],
) -> list[Message]:
    """The stored round that ``inputs`` continue: from the newest message
    that starts a round to the end. When the tail read does not reach back
    to it, the round is larger than any prompt could hold."""
    for i in range(len(tail) - 1, -1, -1):
        if tail[i].starts_round:
            return list(tail[i:])
    if len(tail) == conv.message_count:
        return list(tail)  # a conversation stored without a round start holds one round
    raise ContextOverflowError(
        model=budget.model,
        context_window=budget.context_window,
        max_new_tokens=budget.max_new_tokens,
        required_tokens=REPLY_PRIMING_TOKENS
        + sum(m.token_count for m in (*system, *tail, *inputs))
        + 1,  # at least: the round's start was beyond the tail read
    )


def _check_same_request(stored: TurnRecord, req: ChatRequest) -> None:
    """A request id names one request: reusing it for other input is a
    client bug that a silent replay of the old reply would hide."""
    sent = [_identity(m) for m in req.input_messages if m.role not in INSTRUCTION_ROLES]
    kept = [_identity(m) for m in stored.messages[:-1]]
    if is_resent_history(req.input_messages) and len(sent) > len(kept):
        sent = sent[len(sent) - len(kept) :]  # the history's new suffix is what the turn stored
    if sent != kept:
        raise ConflictError(
            f"request_id {stored.turn_id!r} was already used for a different request on this "
            "conversation; use a new request_id for new input"
        )


def _identity(m: PromptMessage | InputMessage) -> tuple[object, ...]:
    """What makes two messages the same message, whatever their counts or seqs."""
    return (m.role, m.content, m.name, m.parts, m.tool_call_id, m.tool_calls or None)


def _check_paging(**values: int | None) -> None:
    for name, value in values.items():
        lowest = 1 if name == "start_seq" else 0
        if value is not None and not lowest <= value <= MAX_INDEX:
            raise InvalidRequestError(f"must be between {lowest} and {MAX_INDEX}, got {value}", field=name)


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _check_owner(
    conv: Conversation, user_name: str | None, sys_code: str | None, owned_only: bool = False
) -> None:
    if owned_only and conv.user_name is None:
        raise PermissionDeniedError(
            f"conversation {conv.conv_uid!r} has no owner; only an operator may use it"
        )
    if user_name is not None and conv.user_name is not None and conv.user_name != user_name:
        raise PermissionDeniedError(f"conversation {shown(conv.conv_uid)} belongs to another user")
    if sys_code is not None and conv.sys_code is not None and conv.sys_code != sys_code:
        raise PermissionDeniedError(f"conversation {shown(conv.conv_uid)} belongs to another sys_code")


M = TypeVar("M", bound=MessageDraft)


def _recounted(messages: Sequence[M], tok: Tokenizer, recount: bool) -> list[M]:
    """``messages`` with token counts in ``tok``'s encoding, if it differs from the stored one."""
    if not recount:
        return list(messages)
    return [m.model_copy(update={"token_count": count_prompt_message(tok, m)}) for m in messages]


def _as_role(messages: Sequence[MessageDraft], role: str, tok: Tokenizer) -> list[MessageDraft]:
    """Instruction messages under the role the model takes them in, counted
    as sent (the role's own tokens may differ)."""
    return [
        m
        if m.role == role or m.role not in INSTRUCTION_ROLES
        else m.model_copy(update={"role": role, "token_count": count_message(tok, role, m.content, m.name)})
        for m in messages
    ]


def _turn_params(req: ChatRequest, spec: ModelSpec, scene: Scene) -> dict[str, Any]:
    """The parameters the backend gets: the request's, checked against what
    the chat mode and the backend honour, over the model's defaults."""
    asked = req.generation_params()
    if not getattr(scene, "passes_params", False):
        asked = check_supported(asked, frozenset(), f"chat_mode {scene.name!r}")
    asked = check_supported(asked, supported_params(spec.backend), f"model {spec.name!r}")
    defaults = {k: v for k, v in spec.defaults.items() if k != "temperature"}
    return {**defaults, **asked}
