"""What a scene adds to a reply is bounded by the reply's token budget before
it is stored, and the stored reply says it was cut."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convcore import Engine, MemoryStore, ModelRegistry, ModelSpec, get_tokenizer
from convcore.local import LocalBackend
from convcore.scenes import ScenePlan, SceneRequest
from convcore.turn import bound_addition

pytestmark = pytest.mark.anyio

BUDGET = 64


class HugeResultScene:
    """Appends a result far larger than any reply budget (a query's cross join)."""

    name = "chat_huge"
    needs_param = False

    def __init__(self, added: str, *, whole: bool = False) -> None:
        self.added = added
        self.whole = whole

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        return ScenePlan(whole_addition=self.whole)

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        return f"{reply}{self.added}"


def make(added: str, *, whole: bool = False) -> tuple[Engine, MemoryStore]:
    store = MemoryStore()
    spec = ModelSpec(name="m", backend=LocalBackend(), context_window=8192, max_new_tokens=BUDGET)
    return Engine(store, ModelRegistry([spec]), scenes=[HugeResultScene(added, whole=whole)]), store


def added_tokens(reply: str, generated: str) -> int:
    assert reply.startswith(generated)
    return get_tokenizer("cl100k_base").count(reply[len(generated) :])


HUGE = "\n\n| a | b |\n|---|---|\n" + "| x | yyyyyyyy |\n" * 200_000


async def test_a_chat_reply_keeps_what_the_budget_allows_and_says_it_was_cut() -> None:
    engine, store = make(HUGE)
    done = await engine.chat({"messages": "q", "chat_mode": "chat_huge", "conv_uid": "c"})
    reply = (await store.read_messages("c"))[-1].content
    assert reply == done.choices[0].message.content
    generated = "You said: q"
    assert added_tokens(reply, generated) <= BUDGET
    assert "[truncated:" in reply and f"{len(HUGE):,} characters" in reply
    assert len(reply) < 1_000


async def test_a_streamed_reply_is_bounded_the_same_way() -> None:
    engine, store = make(HUGE)
    chunks = [
        c async for c in engine.chat_stream({"messages": "q", "chat_mode": "chat_huge", "conv_uid": "s"})
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    reply = (await store.read_messages("s"))[-1].content
    assert text == reply
    assert added_tokens(reply, "You said: q") <= BUDGET and "[truncated:" in reply


async def test_the_note_that_says_a_result_was_cut_is_never_cut_itself() -> None:
    """A long model reply leaves little of the budget: the addition is bounded
    by what is left, so the stored reply ends with the whole note."""
    tok = get_tokenizer("cl100k_base")
    engine, store = make(HUGE)
    for words in (10, 30, 48):  # the echo reply uses more and more of the 64 tokens
        question = " ".join(["word"] * words)
        done = await engine.chat({"messages": question, "chat_mode": "chat_huge", "conv_uid": f"c{words}"})
        assert done.choices[0].finish_reason == "length"
        reply = (await store.read_messages(f"c{words}"))[-1].content
        assert reply.startswith(f"You said: {question}")
        assert reply.endswith("]") and "\n\n[truncated" in reply, reply[-80:]
        assert tok.count(reply) <= BUDGET


async def test_markup_that_does_not_fit_is_left_out_whole_with_the_note() -> None:
    chart = '\n\n<chart-view content="' + "{&quot;x&quot;: 1}, " * 5_000 + '" />'
    engine, store = make(chart, whole=True)
    done = await engine.chat({"messages": "q", "chat_mode": "chat_huge", "conv_uid": "v"})
    reply = (await store.read_messages("v"))[-1].content
    assert reply.startswith("You said: q\n\n[truncated: this part of the reply was ")
    assert "chart-view" not in reply and done.choices[0].finish_reason == "length"
    fits = '\n\n<chart-view content="{}" />'
    engine, store = make(fits, whole=True)
    await engine.chat({"messages": "q", "chat_mode": "chat_huge", "conv_uid": "f"})
    assert (await store.read_messages("f"))[-1].content == "You said: q" + fits


async def test_an_addition_within_the_budget_is_kept_whole() -> None:
    engine, store = make("\n\n| a |\n|---|\n| 1 |")
    await engine.chat({"messages": "q", "chat_mode": "chat_huge", "conv_uid": "w"})
    assert (await store.read_messages("w"))[-1].content == "You said: q\n\n| a |\n|---|\n| 1 |"


@settings(max_examples=60, deadline=None)
@given(added=st.text(max_size=3000), budget=st.integers(min_value=30, max_value=400))
def test_a_bounded_addition_fits_the_budget_and_is_a_prefix_or_whole(added: str, budget: int) -> None:
    tok = get_tokenizer("cl100k_base")
    out = bound_addition(added, budget, tok)
    if out == added:
        assert tok.count(added) <= budget
    else:
        kept, _note = out.split("\n\n[truncated:", 1)
        assert added.startswith(kept)
        assert tok.count(out) <= budget + 1  # a cut may merge two tokens into one or split one in two
