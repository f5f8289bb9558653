"""The stages of preparing a turn, each a function of what the one before gave.

:class:`~convcore.runner.TurnRunner` calls them in order; each can be called
on its own (a test builds its inputs by hand):

1. :func:`check_request`: what can be refused before any I/O (unknown mode
   or model, oversized inline data, compaction the engine lacks).
2. :func:`read_context`: one store read of the conversation, a retried
   turn and the newest messages the window could use.
3. :func:`resolve`: the conversation's owner and mode, a retried turn
   answered from the store, the scene's plan, the model and tokenizers.
4. :func:`make_drafts`: the request's messages matched against a resent
   history, checked as a tool-call sequence and counted once, as drafts.
5. :func:`gather_history`: the stored messages the window may choose
   from (first rounds, newest rounds, the open round tool results continue).
6. :func:`choose_window`: the prompt within the budget (with a compaction
   summary when one fits) and its trim report.

Validated values go through as they are: the request is validated once at
the edge, a message is counted once, into its draft, and the window is
built once (its frame, what every prompt of the turn holds, sizes the room
for history).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .compaction import Compactor, Summary, summary_message
from .content import check_inline_sizes
from .errors import (
    ConflictError,
    ContextOverflowError,
    ConversationNotFoundError,
    InvalidRequestError,
)
from .history import is_resent_history, match_history, same_message
from .models import (
    INSTRUCTION_ROLES,
    Conversation,
    Message,
    MessageDraft,
    PromptMessage,
    TurnContext,
    TurnRecord,
    trusted,
)
from .observe import annotate, span
from .params import check_supported
from .protocols import ConversationStore, Tokenizer
from .registry import ModelRegistry, ModelSpec, supported_params
from .scenes import Scene, ScenePlan, SceneRegistry, SceneRequest
from .schema import ChatRequest, InputMessage
from .storekit import check_owner
from .tokens import REPLY_PRIMING_TOKENS, count_message, count_prompt_message, get_tokenizer
from .toolcalls import check_tool_sequence, pending_tool_calls
from .trim import TrimReport, trim_report
from .window import Budget, Frame, Window, fill_window, fit_oldest_rounds, frame_window, mark_rounds

__all__ = [
    "Drafts",
    "History",
    "Resolved",
    "Settings",
    "check_owner",
    "check_request",
    "check_retry",
    "check_same_request",
    "choose_window",
    "gather_history",
    "make_drafts",
    "read_context",
    "resolve",
]

_HEAD_PAGE = 64


class Settings(Protocol):
    """The engine's choices a turn's stages follow (an
    :class:`~convcore.engine.Engine` is one; a test may pass any object
    with these attributes)."""

    keep_first_rounds: int
    max_inline_bytes: int
    compaction: Compactor | None
    compact: bool


@dataclass(frozen=True)
class Resolved:
    """Who and what a turn is for: the request (with the conversation's mode
    when it continues one), the conversation, the scene and its plan, the
    model, and the tokenizers of the model and of the conversation."""

    request: ChatRequest
    conv_uid: str
    conversation: Conversation | None
    tail: tuple[Message, ...]  # the newest stored messages read with it
    scene: Scene
    scene_request: SceneRequest
    plan: ScenePlan
    spec: ModelSpec
    tokenizer: Tokenizer  # the model's
    store_tokenizer: Tokenizer  # the conversation's (the model's, for a new one)
    params: dict[str, Any]
    guess: int  # the token budget the tail was read with

    @property
    def encoding(self) -> str:
        return self.store_tokenizer.name

    @property
    def recount(self) -> bool:
        """Whether stored counts are in another encoding than the model's."""
        return self.store_tokenizer is not self.tokenizer


@dataclass(frozen=True)
class Drafts:
    """The turn's new messages as drafts counted in the conversation's
    encoding, the system prompt it sets (None: keeps the stored one), and
    how many request messages a resent history matched."""

    inputs: tuple[MessageDraft, ...]
    system: tuple[MessageDraft, ...] | None
    matched: int = 0


@dataclass(frozen=True)
class History:
    """The stored messages a window may use, counted in the model's
    encoding, and the newest seq that was seen."""

    frame: Frame
    head: tuple[Message, ...] = ()
    tail: tuple[Message, ...] = ()
    last_seen: int = 0


# -- 1. at the edge ----------------------------------------------------------


def check_request(
    req: ChatRequest, scenes: SceneRegistry, models: ModelRegistry, settings: Settings
) -> ModelSpec:
    """Refuse what needs no I/O to refuse; the model the request names (or the default)."""
    annotate(span_id=req.span_id)  # the caller's trace id, for its logs and spans
    if req.chat_mode is not None:
        scenes.get(req)  # an unknown mode fails before any I/O
    annotate(chat_mode=req.mode)  # a known one only: metrics label turns by it
    spec = models.get(req.model)  # an unknown model fails before any I/O too
    compacting(req, settings)
    if not isinstance(req.messages, str):
        for i, m in enumerate(req.messages):
            if m.parts:
                check_inline_sizes(m.parts, settings.max_inline_bytes, f"messages.{i}.content")
    return spec


def compacting(req: ChatRequest, settings: Settings) -> bool:
    """Whether this turn's window may use a compaction summary."""
    if req.compact and settings.compaction is None:
        raise InvalidRequestError("this engine has no compaction configured", field="compact")
    return settings.compaction is not None and (settings.compact if req.compact is None else req.compact)


# -- 2. the store read -------------------------------------------------------


def context_budget(req: ChatRequest, spec: ModelSpec) -> int:
    """Tokens of newest messages worth reading: an upper bound of what a
    window could hold (system prompt and input only shrink it)."""
    return max(spec.context_window - (req.reply_budget or spec.max_new_tokens), 0)


async def read_context(store: ConversationStore, req: ChatRequest, conv_uid: str, guess: int) -> TurnContext:
    """The conversation, a retried turn and the newest messages within ``guess`` tokens, in one read."""
    if req.conv_uid is None and req.request_id is None:
        return TurnContext(conversation=None)  # a conv_uid minted just now cannot exist yet
    with span("convcore.store.read"):
        return await store.read_context(conv_uid, guess, turn_id=req.request_id)


# -- 3. resolve --------------------------------------------------------------


async def resolve(
    req: ChatRequest,
    conv_uid: str,
    ctx: TurnContext,
    *,
    scenes: SceneRegistry,
    models: ModelRegistry,
    guess: int,
    owned_only: bool = False,
) -> Resolved | TurnRecord:
    """The turn's conversation, scene, plan and model; the stored turn
    instead when the request is a retry of one."""
    conv = ctx.conversation
    if conv is None and req.require_existing and ctx.turn is None:
        raise ConversationNotFoundError(conv_uid)
    if conv is not None:
        check_owner(conv, req.user_name, req.sys_code, owned_only)
        if (
            req.chat_mode is None
            and conv.chat_mode in scenes
            and (conv.chat_mode != req.mode or (req.chat_param is None and conv.chat_param is not None))
        ):
            # Continuing by conv_uid keeps the conversation's mode and its parameter.
            req = req.model_copy(
                update={"chat_mode": conv.chat_mode, "chat_param": req.chat_param or conv.chat_param}
            )
    annotate(chat_mode=req.mode)
    if ctx.turn is not None:
        check_same_request(ctx.turn, req)
        return ctx.turn
    scene = scenes.get(req)
    scene_request = SceneRequest(request=req, conversation=conv, models=models, owned_only=owned_only)
    plan = await scene.prepare(scene_request)
    kept_model = conv.model if conv is not None and conv.model in models else None
    spec = models.get(req.model or plan.model or kept_model)
    annotate(model=spec.name)
    tok = get_tokenizer(spec.encoding)
    encoding = conv.encoding if conv is not None else spec.encoding
    return Resolved(
        request=req,
        conv_uid=conv_uid,
        conversation=conv,
        tail=ctx.tail,
        scene=scene,
        scene_request=scene_request,
        plan=plan,
        spec=spec,
        tokenizer=tok,
        store_tokenizer=tok if encoding == spec.encoding else get_tokenizer(encoding),
        params=turn_params(req, spec, scene),
        guess=guess,
    )


def turn_params(req: ChatRequest, spec: ModelSpec, scene: Scene) -> dict[str, Any]:
    """The parameters the backend gets: the request's, checked against what
    the chat mode and the backend honour, over the model's defaults."""
    asked = req.generation_params()
    if asked:
        if not getattr(scene, "passes_params", False):
            asked = check_supported(asked, frozenset(), f"chat_mode {scene.name!r}")
        asked = check_supported(asked, supported_params(spec.backend), f"model {spec.name!r}")
    if not spec.defaults:
        return asked
    defaults = {k: v for k, v in spec.defaults.items() if k != "temperature"}
    return {**defaults, **asked}


# -- 4. drafts ---------------------------------------------------------------


async def make_drafts(store: ConversationStore, r: Resolved) -> Drafts:
    """The request's messages as drafts: a resent history's known part
    dropped, the tool-call sequence checked, each message counted once."""
    given = r.request.input_messages
    conv = r.conversation
    matched = 0
    if conv is not None and conv.message_count and is_resent_history(given):
        logged = [i for i, m in enumerate(given) if m.role not in INSTRUCTION_ROLES]
        known = await store.read_messages(r.conv_uid, limit=min(len(logged), conv.message_count))
        matched = match_history(given, known, conv.message_count)
        check_tool_sequence(given)  # the whole history, from its start
        dropped = set(logged[:matched])
        given = [m for i, m in enumerate(given) if i not in dropped]
    else:
        stored_last = await _last_message(store, r.conv_uid, conv, r.tail)
        check_tool_sequence(given, pending_tool_calls(stored_last), continuing=stored_last is not None)
    tok = r.store_tokenizer
    system_in = [m for m in given if m.role in INSTRUCTION_ROLES]
    others = given if not system_in else [m for m in given if m.role not in INSTRUCTION_ROLES]
    marks = mark_rounds([m.role for m in others])
    inputs = tuple(_draft(tok, m, mark) for m, mark in zip(others, marks, strict=True))
    system = (
        tuple(
            MessageDraft(
                role=m.role,
                content=m.content,
                name=m.name,
                token_count=count_message(tok, m.role, m.content, m.name),
            )
            for m in system_in
        )
        if system_in
        else None
    )
    return Drafts(inputs=inputs, system=system, matched=matched)


def _draft(tok: Tokenizer, m: InputMessage, starts_round: bool) -> MessageDraft:
    if m.name is None and m.tool_call_id is None and m.tool_calls is None and m.parts is None:
        count = count_message(tok, m.role, m.content)
        return trusted(
            MessageDraft, role=m.role, content=m.content, token_count=count, starts_round=starts_round
        )
    return trusted(
        MessageDraft,
        role=m.role,
        content=m.content,
        name=m.name,
        tool_call_id=m.tool_call_id,
        tool_calls=m.tool_calls,
        parts=m.parts,
        token_count=count_prompt_message(tok, m),
        starts_round=starts_round,
    )


async def _last_message(
    store: ConversationStore, conv_uid: str, conv: Conversation | None, tail: Sequence[Message]
) -> Message | None:
    """The conversation's newest stored message (None for a new one)."""
    if conv is None or not conv.message_count:
        return None
    if tail and tail[-1].seq == conv.message_count:
        return tail[-1]
    newest = await store.read_messages(conv_uid, start_seq=conv.message_count, limit=1)
    return newest[-1] if newest else None


# -- 5. history --------------------------------------------------------------


def turn_budget(r: Resolved) -> Budget:
    """The context window and the reply's budget of this turn."""
    max_new = r.request.reply_budget or r.plan.max_new_tokens or r.spec.max_new_tokens
    return Budget(model=r.spec.name, context_window=r.spec.context_window, max_new_tokens=max_new)


async def gather_history(store: ConversationStore, r: Resolved, d: Drafts, settings: Settings) -> History:
    """The window's frame and the stored messages it may hold: the first
    rounds to keep, the newest ones, and the open round that tool results
    continue; all counted in the model's encoding. Raises
    :class:`ContextOverflowError` when the system prompt and input alone do not fit."""
    tok, recount, conv, plan, spec = r.tokenizer, r.recount, r.conversation, r.plan, r.spec
    budget = turn_budget(r)
    stored_system: Sequence[MessageDraft] = (
        d.system if d.system is not None else (conv.system if conv else ())
    )
    scene_system = _scene_messages(tok, [plan.system_prompt] if plan.system_prompt else [])
    prompt_system = _as_role(
        [*scene_system, *_recounted(stored_system, tok, recount)], spec.instruction_role, tok
    )
    prompt_inputs = _recounted(d.inputs, tok, recount)
    context = _as_role(_scene_messages(tok, plan.context), spec.instruction_role, tok) if plan.context else ()
    last_seen = conv.message_count if conv else 0
    open_round: list[Message] = []
    if conv is not None and conv.message_count and d.inputs and not d.inputs[0].starts_round:
        # Tool results continue the stored round of the calls they answer:
        # that round goes into the prompt whole, with them.
        open_round = _recounted(_open_round(r.tail, conv, budget, prompt_system, d.inputs), tok, recount)
    frame = frame_window(
        budget=budget,
        system=prompt_system,
        new_input=prompt_inputs,
        context=context,
        context_share=plan.max_context_share,
        open_round=open_round,
    )
    open_start = open_round[0].seq if open_round else last_seen + 1
    if conv is None or open_start <= 1:
        return History(frame=frame, last_seen=last_seen)
    head: list[Message] = []
    tail: list[Message] = []
    room = frame.history_room()
    keep = _first_set(r.request.keep_first_rounds, plan.keep_first_rounds, settings.keep_first_rounds)
    if keep and room > 0:
        head = await _read_head(store, r.conv_uid, keep, room, tok, recount)
        head = fit_oldest_rounds([m for m in head if m.seq < open_start], room)
        room -= sum(m.token_count for m in head)
    if room > 0:
        if recount:
            tail = await _read_recounted_tail(store, r.conv_uid, room, conv.message_count, tok)
        elif room > r.guess and len(r.tail) < conv.message_count:
            tail = await store.read_tail(r.conv_uid, room)  # a scene widened the room
        else:
            tail = list(r.tail)
        last_seen = max(last_seen, tail[-1].seq if tail else 0)
        head_end = head[-1].seq if head else 0
        if tail and not (head_end < tail[0].seq and tail[-1].seq < open_start):
            tail = [m for m in tail if head_end < m.seq < open_start]
    return History(frame=frame, head=tuple(head), tail=tuple(tail), last_seen=last_seen)


async def _read_head(
    store: ConversationStore, conv_uid: str, rounds: int, room: int, tok: Tokenizer, recount: bool
) -> list[Message]:
    """The first ``rounds`` whole rounds, counted in ``tok``'s encoding,
    reading no further than they could fit in ``room``."""
    head: list[Message] = []
    started = 0
    used = 0
    round_start = 0
    seq = 1
    while True:
        page = await store.read_messages(conv_uid, start_seq=seq, limit=_HEAD_PAGE)
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
    store: ConversationStore, conv_uid: str, room: int, message_count: int, tok: Tokenizer
) -> list[Message]:
    """The newest messages holding at least ``room`` tokens in ``tok``'s
    encoding (or all of them), when they were counted in another one:
    read by stored counts, recount, and read twice as far until covered."""
    budget = room
    while True:
        tail = _recounted(await store.read_tail(conv_uid, budget), tok, True)
        if sum(m.token_count for m in tail) > room or len(tail) >= message_count:
            return tail
        budget *= 2


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


# -- 6. the window -----------------------------------------------------------


async def choose_window(
    store: ConversationStore, r: Resolved, d: Drafts, h: History, settings: Settings
) -> tuple[Window, TrimReport]:
    """The prompt, built once from the frame and the history (with a
    compaction summary of the rounds it dropped, when one exists and fits),
    and its trim report."""
    window = fill_window(h.frame, head=h.head, tail=h.tail)
    summary = None
    conv = r.conversation
    if conv is not None and settings.compaction is not None and compacting(r.request, settings):
        window, summary = await _summarised(store, settings.compaction, r, window, h)
    budget = h.frame.budget
    trim = trim_report(
        chosen=window.chosen,
        prompt_tokens=window.prompt_tokens,
        history_messages=h.last_seen,
        history_total_tokens=conv.total_tokens if conv else 0,
        same_encoding=not r.recount,
        inputs=len(d.inputs),
        summarized=(summary.first, summary.last) if summary else None,
        summarized_tokens=summary.covered_tokens if summary else 0,
        context_window=budget.context_window,
        max_new_tokens=budget.max_new_tokens,
    )
    return window, trim


async def _summarised(
    store: ConversationStore, compactor: Compactor, r: Resolved, window: Window, h: History
) -> tuple[Window, Summary | None]:
    """The window with a summary of the rounds it dropped, when one
    exists (or is due) and fits its share; else the window as it was."""
    kept = sorted(m.seq for m in window.chosen if isinstance(m, Message))
    head_end = 0
    while head_end < len(kept) and kept[head_end] == head_end + 1:
        head_end += 1
    end = (kept[head_end] if head_end < len(kept) else h.last_seen + 1) - 1
    if end < head_end + 1:
        return window, None  # nothing dropped
    summary = await compactor.summary_for(store, r.spec, r.conv_uid, head_end + 1, end)
    if summary is None:
        return window, None
    with_summary = fill_window(
        h.frame,
        head=h.head,
        tail=h.tail,
        summary=summary_message(summary, r.tokenizer),
        summary_share=compactor.share,
    )
    return (with_summary, summary) if with_summary.summary_used else (window, None)


# -- checks shared by the runner and the engine -------------------------------


def check_same_request(stored: TurnRecord, req: ChatRequest) -> None:
    """A request id names one request: reusing it for other input is a
    client bug that a silent replay of the old reply would hide."""
    given = req.input_messages
    sent = [_identity(m) for m in given if m.role not in INSTRUCTION_ROLES]
    kept = [_identity(m) for m in stored.messages[:-1]]
    if is_resent_history(given) and len(sent) > len(kept):
        sent = sent[len(sent) - len(kept) :]  # the history's new suffix is what the turn stored
    if sent != kept:
        raise _reused(stored)


async def check_retry(store: ConversationStore, stored: TurnRecord, req: ChatRequest) -> None:
    """:func:`check_same_request`, and for a resent history also the part
    before the turn's own messages: it must be the history the turn
    followed, the conversation's messages before it (one read, on retries
    only)."""
    check_same_request(stored, req)
    given = req.input_messages
    if not is_resent_history(given):
        return
    logged = [m for m in given if m.role not in INSTRUCTION_ROLES]
    earlier = logged[: max(len(logged) - (len(stored.messages) - 1), 0)]
    if len(earlier) != stored.messages[0].seq - 1:
        raise _reused(stored)
    known = await store.read_messages(stored.conv_uid, limit=len(earlier)) if earlier else []
    if len(known) != len(earlier) or not all(map(same_message, earlier, known)):
        raise _reused(stored)


def _reused(stored: TurnRecord) -> ConflictError:
    return ConflictError(
        f"request_id {stored.turn_id!r} was already used for a different request on this "
        "conversation; use a new request_id for new input"
    )


def _identity(m: PromptMessage | InputMessage) -> tuple[object, ...]:
    """What makes two messages the same message, whatever their counts or seqs."""
    return (m.role, m.content, m.name, m.parts, m.tool_call_id, m.tool_calls or None)


# -- helpers -----------------------------------------------------------------


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _scene_messages(tok: Tokenizer, texts: Sequence[str]) -> list[MessageDraft]:
    return [
        MessageDraft(role="system", content=t, token_count=count_message(tok, "system", t)) for t in texts
    ]


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
