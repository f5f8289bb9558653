"""Checking that tool results answer tool calls, as OpenAI-compatible models require.

An assistant message with ``tool_calls`` must be followed by one ``tool``
message for each call (matched by ``tool_call_id``, in any order) before
anything else; a tool message must answer a call of the assistant message
before it. A model server refuses a prompt that breaks either rule, so a
turn that would store such a history is refused first, naming the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .errors import InvalidRequestError
from .models import INSTRUCTION_ROLES, Role, ToolCall

__all__ = ["check_tool_sequence", "pending_tool_calls"]


class _Message(Protocol):
    @property
    def role(self) -> Role: ...
    @property
    def tool_call_id(self) -> str | None: ...
    @property
    def tool_calls(self) -> tuple[ToolCall, ...] | None: ...


def pending_tool_calls(last: _Message | None) -> list[str]:
    """The call ids a conversation whose newest stored message is ``last``
    waits on: a stored turn ends with the reply, so only a reply that
    called tools leaves calls unanswered."""
    if last is None or last.role != "assistant" or not last.tool_calls:
        return []
    return [c.id for c in last.tool_calls]


def check_tool_sequence(
    messages: Sequence[_Message], pending: Sequence[str] = (), *, continuing: bool = False
) -> None:
    """Raise :class:`InvalidRequestError` at the first message that breaks
    the pairing rule. ``messages`` are the request's, indexed as sent;
    ``pending`` the stored calls they may answer; ``continuing`` whether a
    stored conversation precedes them (a new one cannot start with results)."""
    waiting = list(pending)
    for i, m in enumerate(messages):
        field = f"messages.{i}"
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequestError(
                f"only an assistant message can carry tool_calls, not {m.role!r}", field=field
            )
        if m.role in INSTRUCTION_ROLES:
            continue
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequestError(
                    "a tool message needs the tool_call_id of the call it answers", field=field
                )
            if m.tool_call_id not in waiting:
                if not continuing and not any(
                    x.role != "tool" for x in messages[:i] if x.role not in INSTRUCTION_ROLES
                ):
                    raise InvalidRequestError(
                        "the turn is made only of tool results, but there is no conversation whose tool "
                        "calls they answer; continue the conversation by its conv_uid",
                        field=field,
                    )
                raise InvalidRequestError(
                    f"tool result for tool_call_id {m.tool_call_id!r} has no matching tool call in the "
                    "assistant message before it",
                    field=field,
                )
            waiting.remove(m.tool_call_id)
            continue
        if waiting:
            raise InvalidRequestError(
                f"the assistant's tool calls {waiting} have no tool result before this {m.role} message",
                field=field,
            )
        if m.tool_calls:
            ids = [c.id for c in m.tool_calls]
            if len(set(ids)) != len(ids):
                raise InvalidRequestError("tool call ids must be unique within a message", field=field)
            waiting = ids
    if waiting and messages and messages[-1].role == "tool":
        raise InvalidRequestError(
            f"the assistant's tool calls {waiting} have no tool result", field=f"messages.{len(messages) - 1}"
        )
