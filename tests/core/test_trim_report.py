"""The trim report: every turn says which stored seqs its prompt held, which
it dropped, and the token counts, exactly matching what the model was sent."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import Engine, LocalBackend, MemoryStore, Message, ModelRegistry, ModelSpec, get_tokenizer
from convcore.models import MessageDraft, TurnWrite
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, count_message
from convcore.trim import TrimReport, seq_ranges

pytestmark = pytest.mark.anyio

CL = get_tokenizer("cl100k_base")


async def seed(store: MemoryStore, conv_uid: str, rounds: int) -> None:
    """``rounds`` question/answer pairs, counted exactly, one append each."""
    for i in range(rounds):
        q, a = f"question {i}: " + "word " * (i % 7), f"answer {i}"
        await store.append_turn(
            TurnWrite(
                conv_uid=conv_uid,
                turn_id=f"seed-{i}",
                messages=(
                    MessageDraft(
                        role="user", content=q, token_count=count_message(CL, "user", q), starts_round=True
                    ),
                    MessageDraft(role="assistant", content=a, token_count=count_message(CL, "assistant", a)),
                ),
                encoding="cl100k_base",
                model="m",
                prompt_tokens=0,
                completion_tokens=0,
                created_at=time.time(),
            )
        )


def engine_with(
    backend: RecordingBackend, context_window: int, max_new_tokens: int = 100
) -> tuple[Engine, MemoryStore]:
    store = MemoryStore()
    spec = ModelSpec(name="m", backend=backend, context_window=context_window, max_new_tokens=max_new_tokens)
    return Engine(store, ModelRegistry([spec])), store


def check_against_prompt(report: TrimReport, sent: tuple[object, ...], total_tokens: int) -> None:
    stored = [m for m in sent if isinstance(m, Message)]
    assert report.prompt_seqs == seq_ranges(m.seq for m in stored)
    covered = sorted(
        s
        for a, b in [*report.prompt_seqs, *report.dropped_seqs, *report.summarized_seqs]
        for s in range(a, b + 1)
    )
    assert covered == list(range(1, report.history_messages + 1)), "every stored seq is in exactly one list"
    assert report.history_tokens == sum(m.token_count for m in stored)
    assert report.dropped_tokens == total_tokens - report.history_tokens
    parts = report.system_tokens + report.history_tokens + report.input_tokens + REPLY_PRIMING_TOKENS
    assert parts == report.prompt_tokens
    assert report.prompt_tokens + report.max_new_tokens <= report.context_window


async def test_trim_report_of_a_1000_message_conversation() -> None:
    backend = RecordingBackend(LocalBackend())
    engine, store = engine_with(backend, context_window=1200)
    await seed(store, "long", 500)
    conv = await store.get_conversation("long")
    done = await engine.chat(
        {"messages": "What did I ask first?", "conv_uid": "long", "keep_first_rounds": 1}
    )
    report = done.trim
    assert report is not None and report.history_messages == 1000
    assert conv is not None
    check_against_prompt(report, backend.requests[-1].messages, conv.total_tokens)
    assert report.prompt_seqs[0] == (1, 2), "the first round was kept"
    assert report.prompt_seqs[-1][1] == 1000 and len(report.prompt_seqs) == 2
    assert report.dropped_seqs == [(3, report.prompt_seqs[-1][0] - 1)]
    assert report.prompt_tokens == done.usage.prompt_tokens
    print(json.dumps(report.model_dump(), indent=1))  # shown with -s
    print(report.header())


async def test_the_report_comes_on_the_stream_and_over_http() -> None:
    backend = RecordingBackend(LocalBackend())
    engine, store = engine_with(backend, context_window=300)
    await seed(store, "c", 40)
    stream = await engine.open_stream({"messages": "and now?", "conv_uid": "c"})
    assert stream.trim is not None
    chunks = [c async for c in stream]
    assert chunks[-1].trim == stream.trim and all(c.trim is None for c in chunks[:-1])
    conv = await store.get_conversation("c")
    assert conv is not None and stream.trim.history_messages == 80


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.integers(120, 900), st.integers(1, 60), st.sampled_from([0, 1, 2]))
def test_the_report_matches_what_was_sent(rounds: int, window: int, max_new: int, keep: int) -> None:
    async def run() -> None:
        backend = RecordingBackend(LocalBackend())
        engine, store = engine_with(backend, context_window=window, max_new_tokens=max_new)
        await seed(store, "p", rounds)
        conv = await store.get_conversation("p")
        done = await engine.chat({"messages": "next", "conv_uid": "p", "keep_first_rounds": keep})
        assert done.trim is not None and conv is not None
        check_against_prompt(done.trim, backend.requests[-1].messages, conv.total_tokens)

    asyncio.run(run())
