"""Compaction: dropped rounds summarised once per range, used within their
share, the budget invariant exact, and each summary covering exactly the
seqs it claims."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from convcore import (
    Engine,
    InvalidRequestError,
    LocalBackend,
    MemoryRecordStore,
    MemoryStore,
    Message,
    ModelRegistry,
    ModelSpec,
    get_tokenizer,
)
from convcore.compaction import Compactor
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, count_prompt_message

pytestmark = pytest.mark.anyio

CL = get_tokenizer("cl100k_base")


def make(
    context_window: int = 400,
    max_new: int = 60,
    *,
    share: float = 0.4,
    min_rounds: int = 2,
    latency: float = 0.0,
    compactor: bool = True,
) -> tuple[Engine, RecordingBackend, MemoryRecordStore]:
    backend = RecordingBackend(LocalBackend(latency=latency))
    records = MemoryRecordStore()
    spec = ModelSpec(name="m", backend=backend, context_window=context_window, max_new_tokens=max_new)
    compaction = (
        Compactor(records, share=share, min_rounds=min_rounds, max_new_tokens=80) if compactor else None
    )
    return Engine(MemoryStore(), ModelRegistry([spec]), compaction=compaction), backend, records


def summaries(backend: RecordingBackend) -> list[Any]:
    return [r for r in backend.requests if r.purpose == "summary"]


async def talk(engine: Engine, turns: int, conv_uid: str | None = None, **extra: Any) -> str:
    for i in range(turns):
        done = await engine.chat({"messages": f"note {i}: topic {i * 7}", "conv_uid": conv_uid, **extra})
        conv_uid = done.conv_uid
    assert conv_uid is not None
    return conv_uid


async def test_summaries_are_made_once_per_range_never_per_turn() -> None:
    engine, backend, _ = make(min_rounds=3)
    conv_uid = await talk(engine, 40)
    made = summaries(backend)
    claimed = [
        tuple(map(int, re.findall(r"^Messages (\d+)-(\d+)\.", r.messages[-1].content)[0])) for r in made
    ]
    assert 5 <= len(made) <= 40 // 3, "a summary every few turns, not every turn"
    assert len(set(claimed)) == len(claimed), "no range summarised twice"
    assert all(first == 1 for first, _ in claimed) and [b for _, b in claimed] == sorted(
        b for _, b in claimed
    )
    last = await engine.chat({"messages": "and now?", "conv_uid": conv_uid})
    newest = re.findall(r"^Messages 1-(\d+)\.", summaries(backend)[-1].messages[-1].content)
    assert last.trim is not None and last.trim.summarized_seqs == [(1, int(newest[0]))]
    assert (
        backend.requests[-1]
        .messages[0]
        .content.startswith(f"Summary of the earlier conversation (messages 1-{newest[0]})")
    )


async def test_a_window_that_drops_less_than_the_newest_summary_uses_an_earlier_one() -> None:
    """A smaller reply budget keeps more rounds than the newest summary left
    out: an earlier range is used, not the same ranges made again every turn."""
    backend = RecordingBackend()
    records = MemoryRecordStore()
    spec = ModelSpec(name="m", backend=backend, context_window=1500, max_new_tokens=60)
    engine = Engine(MemoryStore(), ModelRegistry([spec]), compaction=Compactor(records))
    conv_uid = await talk(engine, 30, max_new_tokens=700)
    before = [_rendered(r)[0] for r in summaries(backend)]
    newest = before[-1][1]
    for i in range(5):
        done = await engine.chat({"messages": f"short {i}", "conv_uid": conv_uid, "max_new_tokens": 300})
        assert done.trim is not None and done.trim.summarized_seqs
        assert done.trim.summarized_seqs[0][1] < newest, "the newest summary reaches into the kept rounds"
    claimed = [_rendered(r)[0] for r in summaries(backend)]
    assert len(claimed) - len(before) <= 5 // 2, f"a summary every turn: {claimed[len(before) :]}"
    assert len(set(claimed)) == len(claimed), f"a range was summarised twice: {claimed}"
    ranges = (await records.get("summary-latest", conv_uid) or {})["ranges"]
    assert sorted(ranges) == sorted(b for _, b in claimed), "every range is listed, so deleting finds it"


async def test_racing_turns_never_summarise_a_range_twice() -> None:
    engine, backend, _ = make(min_rounds=2, latency=0.01)
    # Far more rounds than the window holds, none summarised yet; then many turns at once.
    conv_uid = await talk(engine, 20, compact=False)
    assert summaries(backend) == []
    done = await asyncio.gather(
        *(engine.chat({"messages": f"racer {i}", "conv_uid": conv_uid}) for i in range(8))
    )
    claimed = [_rendered(r)[0] for r in summaries(backend)]
    assert claimed, "the racers needed a summary"
    assert len(set(claimed)) == len(claimed), f"a range was summarised twice: {claimed}"
    assert [b for _, b in claimed] == sorted({b for _, b in claimed}), "each one extends the last"
    used = {d.trim.summarized_seqs[0] for d in done if d.trim and d.trim.summarized_seqs}
    assert used <= set(claimed)


async def test_summaries_are_deterministic_and_opt_in() -> None:
    texts = []
    for _ in range(2):
        engine, backend, records = make()
        conv_uid = await talk(engine, 12)
        latest = await records.get("summary-latest", conv_uid)
        assert latest is not None
        texts.append([latest["content"], *(r.messages[-1].content for r in summaries(backend))])
    assert texts[0] == texts[1] and texts[0]
    off, backend, _ = make()
    await talk(off, 12, compact=False)
    assert summaries(backend) == []
    plain, _, _ = make(compactor=False)
    with pytest.raises(InvalidRequestError, match="no compaction"):
        await plain.chat({"messages": "x", "compact": True})


async def test_a_failing_summariser_does_not_fail_the_turn() -> None:
    engine, backend, records = make()
    backend.fail = lambda request: request.purpose == "summary"
    conv_uid = await talk(engine, 15)
    assert summaries(backend), "summaries were asked for"
    assert await records.get("summary-latest", conv_uid) is None
    done = await engine.chat({"messages": "still here?", "conv_uid": conv_uid})
    assert done.trim is not None and done.trim.summarized_seqs == [] and done.trim.dropped_seqs


async def test_deleting_a_conversation_forgets_its_summaries() -> None:
    engine, _, records = make()
    conv_uid = await talk(engine, 12)
    assert await records.get("summary-latest", conv_uid) is not None
    assert await engine.delete_conversation(conv_uid)
    assert await records.get("summary-latest", conv_uid) is None
    assert await records.list("summary") == []


def _rendered(request: Any) -> tuple[tuple[int, int], list[int], tuple[int, int] | None]:
    """(claimed range, seqs rendered, previous summary's range) of a summariser input."""
    text = request.messages[-1].content
    claimed = tuple(map(int, re.match(r"Messages (\d+)-(\d+)\.", text).groups()))  # type: ignore[union-attr]
    seqs = [int(s) for s in re.findall(r"^\[(\d+)\] ", text, re.M)]
    prev = re.search(r"^Summary of messages (\d+)-(\d+): ", text, re.M)
    return claimed, seqs, (tuple(map(int, prev.groups())) if prev else None)  # type: ignore[return-value]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 30), min_size=8, max_size=30),
    st.integers(200, 600),
    st.integers(1, 50),
    st.sampled_from([0.1, 0.3, 0.6, 1.0]),
    st.integers(1, 3),
    st.sampled_from([0, 1]),
)
def test_budget_invariant_holds_with_summaries_that_cover_what_they_claim(
    sizes: list[int], window: int, max_new: int, share: float, min_rounds: int, keep: int
) -> None:
    async def run() -> None:
        engine, backend, records = make(window, max_new, share=share, min_rounds=min_rounds)
        conv_uid = None
        for n in sizes:
            done = await engine.chat(
                {"messages": "w " * n + "?", "conv_uid": conv_uid, "keep_first_rounds": keep}
            )
            conv_uid = done.conv_uid
            prompt = backend.requests[-1].messages
            assert backend.requests[-1].purpose == "reply"
            tokens = REPLY_PRIMING_TOKENS + sum(count_prompt_message(CL, m) for m in prompt)
            assert tokens == done.usage.prompt_tokens and tokens + max_new <= window
            trim = done.trim
            assert trim is not None
            stored = {m.seq for m in prompt if isinstance(m, Message)}
            covered = {s for a, b in trim.summarized_seqs for s in range(a, b + 1)}
            dropped = {s for a, b in trim.dropped_seqs for s in range(a, b + 1)}
            assert stored | covered | dropped == set(range(1, trim.history_messages + 1))
            assert not (stored & covered or stored & dropped or covered & dropped)
            if trim.summarized_seqs:
                [(a, b)] = trim.summarized_seqs
                assert any(
                    m.content.startswith(f"Summary of the earlier conversation (messages {a}-{b})")
                    for m in prompt
                )
        event("summaries made" if summaries(backend) else "no summary made")
        for request in summaries(backend):
            asked = REPLY_PRIMING_TOKENS + sum(count_prompt_message(CL, m) for m in request.messages)
            assert asked + request.max_new_tokens <= window, "the summariser's prompt fits the model too"
            (first, last), seqs, previous = _rendered(request)
            assert seqs, "a summary reads at least one message"
            begin = previous[1] + 1 if previous else first
            assert seqs == list(range(begin, last + 1)), "it covers exactly the seqs it claims"
            if previous:
                assert previous[0] == first
        if conv_uid and summaries(backend):
            latest = await records.get("summary-latest", conv_uid)
            assert latest is not None
            assert (latest["first"], latest["last"]) == _rendered(summaries(backend)[-1])[0]

    asyncio.run(run())
