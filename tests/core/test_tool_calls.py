"""Tool-calling conversations through the engine: stored, counted, paired, checked.

An assistant message that calls tools and the tool results answering it are
one exchange: the window keeps or drops them together, a continuation by
conv_uid sends the stored calls with the new results, and a malformed
sequence is refused before the model is asked, storing nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from convcore import (
    ContextOverflowError,
    Engine,
    FunctionCall,
    InvalidRequestError,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    PromptMessage,
    ToolCall,
    get_tokenizer,
)
from convcore.testing import ScriptedBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, count_message, count_prompt_message

pytestmark = pytest.mark.anyio

CL = get_tokenizer("cl100k_base")


def make(backend: ScriptedBackend, context_window: int = 8192, max_new_tokens: int = 64) -> Engine:
    spec = ModelSpec(name="m", backend=backend, context_window=context_window, max_new_tokens=max_new_tokens)
    return Engine(MemoryStore(), ModelRegistry([spec]))


def results_for(calls: Sequence[Any], text: str = "done") -> list[dict[str, Any]]:
    return [{"role": "tool", "tool_call_id": c.id, "content": f"{text} {c.id}"} for c in calls]


def pairing_problems(messages: Sequence[PromptMessage]) -> list[str]:
    """Independently of convcore: every tool result follows the assistant
    call it answers (only results in between), and every call is answered."""
    problems = []
    waiting: list[str] = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in waiting:
                problems.append(f"{i}: orphaned result {m.tool_call_id}")
            else:
                waiting.remove(m.tool_call_id)
            continue
        if waiting:
            problems.append(f"{i}: calls {waiting} unanswered")
        waiting = [c.id for c in m.tool_calls or ()]
    if waiting:
        problems.append(f"end: calls {waiting} unanswered")
    return problems


# -- counting -----------------------------------------------------------------


def test_tool_fields_are_counted_like_every_other_string_field() -> None:
    base = count_message(CL, "tool", "18C")
    assert count_message(CL, "tool", "18C", tool_call_id="call_abc") == base + CL.count("call_abc")
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'))
    plain = count_message(CL, "assistant", "")
    with_call = count_message(CL, "assistant", "", tool_calls=[call])
    expected = sum(CL.count(s) for s in ("call_1", "function", "get_weather", '{"city":"Paris"}'))
    assert with_call == plain + expected


# -- the loop ------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_two_step_tool_loop_continued_by_conv_uid(streaming: bool) -> None:
    backend = ScriptedBackend(
        [
            [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Oslo"}')],
            [("convert", '{"c": 18}')],
            "Paris is warmer.",
        ]
    )
    engine = make(backend)

    async def turn(body: dict[str, Any]) -> tuple[str, tuple[ToolCall, ...] | None, str, str]:
        if not streaming:
            done = await engine.chat(body)
            message = done.choices[0].message
            return (
                message.content or "",
                message.tool_calls,
                done.choices[0].finish_reason or "",
                done.conv_uid,
            )
        text, calls, finish, uid = "", None, "", ""
        async for chunk in engine.chat_stream(body):
            uid = chunk.conv_uid
            delta = chunk.choices[0].delta
            text += delta.content or ""
            if delta.tool_calls:
                calls = tuple(ToolCall(id=d.id, function=d.function) for d in delta.tool_calls)
            finish = chunk.choices[0].finish_reason or finish
        return text, calls, finish, uid

    text, calls, finish, conv_uid = await turn({"messages": "Which is warmer, Paris or Oslo?"})
    assert (text, finish) == ("", "tool_calls")
    assert calls is not None and [c.function.arguments for c in calls] == [
        '{"city": "Paris"}',
        '{"city": "Oslo"}',
    ]
    text, calls, finish, _ = await turn({"messages": results_for(calls, "18C"), "conv_uid": conv_uid})
    assert finish == "tool_calls" and calls is not None and calls[0].function.name == "convert"
    text, calls, finish, _ = await turn({"messages": results_for(calls, "64F"), "conv_uid": conv_uid})
    assert (text, calls, finish) == ("Paris is warmer.", None, "stop")

    stored = await engine.read_messages(conv_uid)
    assert [m.role for m in stored] == ["user", "assistant", "tool", "tool", "assistant", "tool", "assistant"]
    assert [m.starts_round for m in stored] == [True] + [False] * 6, "the exchange is one round"
    assert stored[1].tool_calls is not None and [c.id for c in stored[1].tool_calls] == ["call_1", "call_2"]
    assert [m.tool_call_id for m in stored if m.role == "tool"] == ["call_1", "call_2", "call_3"]
    for m in stored:
        assert m.token_count == count_prompt_message(CL, m)
    last_prompt = backend.requests[-1].messages
    assert [m.role for m in last_prompt] == [m.role for m in stored[:-1]]
    assert pairing_problems(last_prompt) == []


async def test_a_full_history_with_tool_calls_starts_a_conversation() -> None:
    backend = ScriptedBackend(["It is 18C."])
    engine = make(backend)
    call = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    done = await engine.chat(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_9", "content": "18C"},
            ]
        }
    )
    assert done.content == "It is 18C."
    stored = await engine.read_messages(done.conv_uid)
    assert [(m.role, m.content) for m in stored] == [
        ("user", "weather?"),
        ("assistant", ""),
        ("tool", "18C"),
        ("assistant", "It is 18C."),
    ]
    assert stored[1].tool_calls == (ToolCall.model_validate(call),)


# -- malformed sequences -------------------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "field", "says"),
    [
        (
            [{"role": "tool", "tool_call_id": "call_1", "content": "x"}],
            "messages.0",
            "made only of tool results",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "x"}],
            "messages.1",
            "no matching tool call",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_2", "content": "x"},
            ],
            "messages.2",
            "'call_2' has no matching tool call",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "user", "content": "and?"},
            ],
            "messages.2",
            "['call_1'] have no tool result",
        ),
        ([{"role": "tool", "content": "x"}], "messages.0", "needs the tool_call_id"),
        ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages.0", "only an assistant message"),
    ],
    ids=["only-tool", "no-call", "wrong-id", "unanswered", "no-id", "user-calls"],
)
async def test_malformed_tool_sequences_are_refused(
    messages: list[dict[str, Any]], field: str, says: str
) -> None:
    backend = ScriptedBackend(["never"])
    engine = make(backend)
    with pytest.raises(InvalidRequestError, match=re.escape(says)) as err:
        await engine.chat({"messages": messages})
    assert err.value.field == field
    assert backend.requests == []
    assert await engine.list_conversations() == []


async def test_a_continuation_must_answer_the_stored_calls() -> None:
    backend = ScriptedBackend([[("f", "{}"), ("g", "{}")], "ok"])
    engine = make(backend)
    first = await engine.chat({"messages": "go"})
    calls = first.choices[0].message.tool_calls
    assert calls is not None
    bad = [
        ({"role": "user", "content": "never mind"}, "have no tool result"),
        ({"role": "tool", "tool_call_id": "call_x", "content": "?"}, "no matching tool call"),
    ]
    for message, says in bad:
        with pytest.raises(InvalidRequestError, match=says):
            await engine.chat({"messages": [message], "conv_uid": first.conv_uid})
    with pytest.raises(InvalidRequestError, match=r"\['call_2'\] have no tool result"):
        await engine.chat({"messages": results_for(calls[:1]), "conv_uid": first.conv_uid})
    assert len(await engine.read_messages(first.conv_uid)) == 2, "refused turns stored nothing"
    done = await engine.chat({"messages": results_for(calls[::-1]), "conv_uid": first.conv_uid})
    assert done.content == "ok", "results may come in any order"


async def test_results_whose_round_cannot_fit_overflow_instead_of_going_out_orphaned() -> None:
    backend = ScriptedBackend([[("f", "{}")], "never"])
    engine = make(backend, context_window=200, max_new_tokens=20)
    first = await engine.chat({"messages": "word " * 100})
    calls = first.choices[0].message.tool_calls
    assert calls is not None
    with pytest.raises(ContextOverflowError):
        await engine.chat({"messages": results_for(calls, "r " * 60), "conv_uid": first.conv_uid})
    assert len(backend.requests) == 1


# -- property: pairs are never split ------------------------------------------

step = st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(0, 40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=12), st.integers(60, 400), st.integers(1, 40), st.booleans())
def test_tool_calls_and_their_results_are_never_split(
    steps: list[tuple[int, int, int]], context_window: int, max_new: int, keep_first: bool
) -> None:
    """Whatever the window drops, every prompt holds each call with all its
    results or neither, and stays within the budget, counted exactly."""

    async def run() -> None:
        backend = ScriptedBackend()
        engine = make(backend, context_window=context_window, max_new_tokens=max_new)
        conv_uid: str | None = None
        waiting: tuple[ToolCall, ...] = ()
        for n_calls, size, result_size in steps:
            backend.add([("f", "a" * size)] * n_calls if n_calls else "x " * size)
            if waiting:
                body: dict[str, Any] = {"messages": results_for(waiting, "r " * result_size)}
            else:
                body = {"messages": "q " * size + "?"}
            body |= {"conv_uid": conv_uid, "keep_first_rounds": 1 if keep_first else 0}
            asked = len(backend.requests)
            try:
                done = await engine.chat(body)
            except ContextOverflowError:
                if waiting:
                    return  # the open exchange can never fit again
                backend.replies.pop()
                continue
            assert len(backend.requests) == asked + 1
            prompt = backend.requests[-1].messages
            if any(m.tool_calls for m in prompt) and done.trim and done.trim.dropped_seqs:
                event("tool calls in a window that dropped rounds")
            assert pairing_problems(prompt) == []
            tokens = REPLY_PRIMING_TOKENS + sum(count_prompt_message(CL, m) for m in prompt)
            assert tokens + max_new <= context_window
            assert done.usage.prompt_tokens == tokens
            conv_uid = done.conv_uid
            waiting = done.choices[0].message.tool_calls or ()

    asyncio.run(run())
