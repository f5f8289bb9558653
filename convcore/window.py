"""Choosing what history goes into a prompt, within the token budget.

The prompt is: system messages, the first ``keep_first_rounds`` rounds, the
newest whole rounds that still fit, and the new input. A round is a user
message and everything up to the next user message that starts a round; a
window never begins mid-round. Tool results never start a round, so an
assistant message that calls tools and the results that answer it are
always kept or dropped together. Everything is counted exactly, so::

    prompt_tokens + max_new_tokens <= context_window

holds for every prompt this module returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, TypeVar

from .content import ContentPart
from .errors import ContextOverflowError
from .generation import PromptMessage
from .models import Message, MessageDraft, Role, ToolCall
from .tokens import REPLY_PRIMING_TOKENS

__all__ = [
    "Budget",
    "Frame",
    "Window",
    "build_window",
    "fill_window",
    "frame_window",
    "mark_rounds",
    "whole_round_suffix",
]


class Counted(Protocol):
    """A message with its prompt cost and round boundary, stored or not."""

    @property
    def role(self) -> Role: ...
    @property
    def content(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def tool_call_id(self) -> str | None: ...
    @property
    def tool_calls(self) -> tuple[ToolCall, ...] | None: ...
    @property
    def parts(self) -> tuple[ContentPart, ...] | None: ...
    @property
    def token_count(self) -> int: ...
    @property
    def starts_round(self) -> bool: ...


T = TypeVar("T", bound=Counted)


@dataclass(frozen=True)
class Budget:
    """The numbers a window must respect."""

    model: str
    context_window: int
    max_new_tokens: int

    @property
    def prompt_limit(self) -> int:
        return self.context_window - self.max_new_tokens


@dataclass(frozen=True)
class Window:
    """The prompt chosen for one turn and its exact token count."""

    chosen: tuple[Counted, ...]
    prompt_tokens: int
    history_used: int  # messages taken from earlier turns (head and tail)
    context_used: int = 0  # scene context blocks that fit
    summary_used: bool = False

    @cached_property
    def messages(self) -> tuple[PromptMessage, ...]:
        """The prompt as the model gets it (built only when asked for: a
        window that only measures the room never needs it)."""
        known = _PROMPT_TYPES  # a set lookup per message; anything else goes through _prompt
        chosen: tuple[Any, ...] = self.chosen
        return tuple([m if type(m) in known else _prompt(m) for m in chosen])


# Stored messages and drafts already are prompt messages.
_PROMPT_TYPES: frozenset[type] = frozenset({PromptMessage, MessageDraft, Message})


def mark_rounds(roles: Sequence[str]) -> list[bool]:
    """Which messages start a round, for a turn's new non-system messages.

    The first one does (a turn starts after a finished reply) unless it is a
    tool result, which continues the round of the call it answers; so does
    a user message that follows anything but another user message.
    """
    marks = []
    for i, role in enumerate(roles):
        marks.append((i == 0 and role != "tool") or (role == "user" and i > 0 and roles[i - 1] != "user"))
    return marks


def whole_round_suffix(messages: Sequence[T]) -> list[T]:
    """``messages`` without a leading partial round."""
    for i, m in enumerate(messages):
        if m.starts_round:
            return list(messages[i:])
    return []


def fit_newest_rounds(messages: Sequence[T], budget: int) -> list[T]:
    """The longest suffix of whole rounds whose tokens sum to at most ``budget``."""
    return list(messages[_newest_rounds(messages, budget)[0] :])


def _newest_rounds(messages: Sequence[Counted], budget: int) -> tuple[int, int]:
    """Where :func:`fit_newest_rounds`' suffix starts, and its tokens. A
    leading partial round is never in it (its messages precede every round start)."""
    total = 0
    best = len(messages)
    best_total = 0
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        total += m.token_count
        if total > budget:
            break
        if m.starts_round:
            best, best_total = i, total
    return best, best_total


def fit_oldest_rounds(messages: Sequence[T], budget: int) -> list[T]:
    """The longest prefix of whole rounds whose tokens sum to at most ``budget``."""
    total = 0
    best = 0
    for i, m in enumerate(messages):
        if m.starts_round:
            best = i
        total += m.token_count
        if total > budget:
            return list(messages[:best])
    return list(messages)


def _prompt(m: Counted) -> PromptMessage:
    if isinstance(m, PromptMessage):
        return m  # stored messages and drafts already are prompt messages
    return PromptMessage(
        role=m.role,
        content=m.content,
        name=m.name,
        tool_call_id=m.tool_call_id,
        tool_calls=m.tool_calls,
        parts=m.parts,
    )


@dataclass(frozen=True)
class Frame:
    """What every prompt of one turn holds whatever history it gets: the
    system messages, the scene context that fits, the input that must fit,
    and the room left for history (earlier input rounds compete for it)."""

    budget: Budget
    system: tuple[Counted, ...]
    context: tuple[Counted, ...]
    required_input: tuple[Counted, ...]
    earlier: tuple[Counted, ...]  # earlier input rounds (after an open round's stored start)
    open_round_used: int  # stored messages of the open round that are required, not competing
    room: int  # tokens left after the required messages and context

    def history_room(self) -> int:
        """The room a window of this frame leaves for stored history: what
        it leaves when it holds no history (earlier input rounds kept)."""
        return self.room - sum(m.token_count for m in fit_newest_rounds(self.earlier, self.room))


def frame_window(
    *,
    budget: Budget,
    system: Sequence[Counted],
    new_input: Sequence[Counted],
    context: Sequence[Counted] = (),
    context_share: float = 1.0,
    open_round: Sequence[Counted] = (),
) -> Frame:
    """The frame of a turn's prompt (see :func:`build_window` for the
    arguments). Raises :class:`ContextOverflowError` when the system
    messages and the last input round alone do not fit."""
    starts = [i for i, m in enumerate(new_input) if m.starts_round]
    last_round = starts[-1] if starts else 0
    if starts:
        required_input = tuple(new_input[last_round:])
        earlier = (*open_round, *new_input[:last_round])
    else:
        required_input, earlier = (*open_round, *new_input), ()
    system = tuple(system)
    required_tokens = (
        REPLY_PRIMING_TOKENS + sum(m.token_count for m in system) + sum(m.token_count for m in required_input)
    )
    if required_tokens > budget.prompt_limit:
        raise ContextOverflowError(
            model=budget.model,
            context_window=budget.context_window,
            max_new_tokens=budget.max_new_tokens,
            required_tokens=required_tokens,
        )
    room = budget.prompt_limit - required_tokens
    kept_context: list[Counted] = []
    if context:
        share = context_share if math.isfinite(context_share) else 0.0
        context_room = int(room * min(max(share, 0.0), 1.0))
        for block in context:
            if block.token_count > context_room:
                break  # a prefix, so "the first n blocks" says which were used
            kept_context.append(block)
            context_room -= block.token_count
            room -= block.token_count
    return Frame(
        budget=budget,
        system=system,
        context=tuple(kept_context),
        required_input=required_input,
        earlier=earlier,
        open_round_used=0 if starts else len(open_round),
        room=room,
    )


def fill_window(
    frame: Frame,
    *,
    head: Sequence[Counted] = (),
    tail: Sequence[Counted] = (),
    summary: Counted | None = None,
    summary_share: float = 0.0,
) -> Window:
    """The prompt of ``frame`` with the history that fits (see :func:`build_window`)."""
    room = frame.room
    kept_head = fit_oldest_rounds(head, room) if head else []
    room -= sum(m.token_count for m in kept_head)
    kept_summary = []
    if summary is not None and summary.token_count <= int(room * min(max(summary_share, 0.0), 1.0)):
        kept_summary.append(summary)
        room -= summary.token_count
    newest_seen = [*whole_round_suffix(tail), *frame.earlier] if frame.earlier else tail
    start, tail_tokens = _newest_rounds(newest_seen, room)
    kept_tail = newest_seen[start:]
    chosen = (*frame.system, *frame.context, *kept_head, *kept_summary, *kept_tail, *frame.required_input)
    return Window(
        chosen=chosen,
        prompt_tokens=frame.budget.prompt_limit - room + tail_tokens,
        history_used=len(kept_head) + len(kept_tail) + frame.open_round_used,
        context_used=len(frame.context),
        summary_used=bool(kept_summary),
    )


def build_window(
    *,
    budget: Budget,
    system: Sequence[Counted],
    head: Sequence[Counted],
    tail: Sequence[Counted],
    new_input: Sequence[Counted],
    context: Sequence[Counted] = (),
    context_share: float = 1.0,
    open_round: Sequence[Counted] = (),
    summary: Counted | None = None,
    summary_share: float = 0.0,
) -> Window:
    """Assemble the prompt.

    ``new_input`` is the request's non-system messages: its last round is the
    input that must fit, its earlier rounds compete with stored history.
    ``context`` blocks (a scene's, in priority order) come right after the
    system messages: the longest prefix of whole blocks that fits in
    ``context_share`` of the room left. ``head`` is the first rounds to keep
    (whole rounds, oldest first) and ``tail`` the newest stored messages
    (any suffix; a partial first round is dropped here). ``open_round`` is
    the stored start of the round that ``new_input`` continues when it does
    not start one (tool results answering the stored tool calls): it is
    required with the input. ``summary`` (a system message standing in for
    dropped rounds) goes after the head when it fits in ``summary_share`` of
    the room left after the required messages and context. Raises
    :class:`ContextOverflowError` when the system messages and the last input
    round alone do not fit.
    """
    frame = frame_window(
        budget=budget,
        system=system,
        new_input=new_input,
        context=context,
        context_share=context_share,
        open_round=open_round,
    )
    return fill_window(frame, head=head, tail=tail, summary=summary, summary_share=summary_share)
