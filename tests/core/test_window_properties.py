"""Property tests of the window, counted with the real cl100k_base encoding."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import ContextOverflowError, Engine, MemoryStore, ModelRegistry, ModelSpec, get_tokenizer
from convcore.models import MessageDraft
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, count_message
from convcore.window import Budget, build_window, mark_rounds

TOK = get_tokenizer("cl100k_base")
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
role_runs = st.lists(st.sampled_from(["user", "assistant", "tool"]), min_size=1, max_size=4)


def drafts(roles: list[str], contents: list[str]) -> list[MessageDraft]:
    marks = mark_rounds(roles)
    return [
        MessageDraft(role=r, content=c, token_count=count_message(TOK, r, c), starts_round=m)  # type: ignore[arg-type]
        for r, c, m in zip(roles, contents, marks, strict=True)
    ]


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[MessageDraft], list[MessageDraft], list[MessageDraft]]:
    """(system, history, new input): history is whole rounds, input one round."""
    rounds = draw(st.lists(st.tuples(text, text), max_size=12))
    history: list[MessageDraft] = []
    for q, a in rounds:
        history += drafts(["user", "assistant"], [q, a])
    system = [
        MessageDraft(role="system", content=s, token_count=count_message(TOK, "system", s))
        for s in draw(st.lists(text, max_size=2))
    ]
    new_input = drafts(["user"], [draw(text)])
    return system, history, new_input


def exact_tokens(messages: object) -> int:
    return REPLY_PRIMING_TOKENS + sum(
        len(TOK.encode(m.role)) + len(TOK.encode(m.content)) + 3  # type: ignore[attr-defined]
        for m in messages  # type: ignore[attr-defined]
    )


@settings(max_examples=300, deadline=None)
@given(conversations(), st.integers(min_value=8, max_value=600), st.integers(min_value=1, max_value=200))
def test_window_fits_and_is_the_longest_suffix_of_whole_rounds(
    conv: tuple[list[MessageDraft], list[MessageDraft], list[MessageDraft]], window: int, max_new: int
) -> None:
    system, history, new_input = conv
    budget = Budget(model="m", context_window=window, max_new_tokens=max_new)
    try:
        built = build_window(budget=budget, system=system, head=(), tail=history, new_input=new_input)
    except ContextOverflowError as err:
        assert exact_tokens([*system, *new_input]) + max_new > window
        assert err.required_tokens == exact_tokens([*system, *new_input])
        return
    # The invariant, with the count redone from scratch by tiktoken.
    assert built.prompt_tokens == exact_tokens(built.messages)
    assert built.prompt_tokens + max_new <= window
    # System first, new input last, and in between a suffix of history.
    n_sys = len(system)
    assert [m.content for m in built.messages[:n_sys]] == [m.content for m in system]
    assert built.messages[-1].content == new_input[0].content
    kept = [(m.role, m.content) for m in built.messages[n_sys:-1]]
    start = len(history) - len(kept)
    assert kept == [(m.role, m.content) for m in history[start:]]
    # It starts at a round and no longer suffix of whole rounds would fit.
    assert start == len(history) or history[start].starts_round
    room = window - max_new - exact_tokens([*system, *new_input])
    for earlier in range(start - 1, -1, -1):
        if history[earlier].starts_round:
            assert sum(m.token_count for m in history[earlier:]) > room
            break


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(text.filter(lambda t: t.strip() != ""), min_size=1, max_size=25),
    st.integers(min_value=60, max_value=400),
    st.integers(min_value=1, max_value=40),
)
def test_engine_prompts_respect_the_budget_and_store_everything_in_order(
    inputs: list[str], window: int, max_new: int
) -> None:
    """Through the engine and a store: every prompt fits, every stored turn is
    there in order, and the prompt is a whole-round suffix ending in the input."""

    async def run() -> None:
        backend = RecordingBackend()
        store = MemoryStore()
        spec = ModelSpec(name="m", backend=backend, context_window=window, max_new_tokens=max_new)
        engine = Engine(store, ModelRegistry([spec]))
        conv = "prop"
        stored_inputs = []
        for q in inputs:
            try:
                reply = await engine.chat({"messages": q, "conv_uid": conv})
            except ContextOverflowError:
                continue
            stored_inputs.append(q)
            sent = backend.requests[-1].messages
            assert exact_tokens(sent) == reply.usage.prompt_tokens
            assert reply.usage.prompt_tokens + max_new <= window
            assert sent[0].role == "user" and sent[-1].content == q
        msgs = await store.read_messages(conv)
        assert [m.content for m in msgs[::2]] == stored_inputs
        assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))

    asyncio.run(run())
