"""The window promises, checked through the engine (not just build_window).

Every prompt the engine sends must satisfy
``prompt_tokens + max_new_tokens <= context_window`` counted with the model's
own encoding, start its history at round boundaries, and (when the stored
counts are in the model's encoding) be the longest suffix of whole rounds that
fits after the first rounds kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import (
    ContextOverflowError,
    Engine,
    HistoryConflictError,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    get_tokenizer,
)
from convcore.generation import GenerationRequest, PromptMessage
from convcore.models import Message, MessageDraft, TurnWrite
from convcore.scenes import ScenePlan, SceneRequest
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, count_message, count_prompt_message

pytestmark = pytest.mark.anyio

CL = get_tokenizer("cl100k_base")
O2 = get_tokenizer("o200k_base")


def exact_prompt_tokens(messages: Sequence[PromptMessage], encoding: str) -> int:
    tok = get_tokenizer(encoding)
    return REPLY_PRIMING_TOKENS + sum(count_prompt_message(tok, m) for m in messages)


def short_reply(messages: tuple[PromptMessage, ...]) -> str:
    return "ok " + messages[-1].content[:12]


def rounds_of(messages: Sequence[Message]) -> list[list[Message]]:
    rounds: list[list[Message]] = []
    for m in messages:
        if m.starts_round or not rounds:
            rounds.append([m])
        else:
            rounds[-1].append(m)
    return rounds


# -- hypothesis: sequences of requests through the engine ------------------

text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
    min_size=0,
    max_size=30,
)
nonblank = text.filter(lambda s: bool(s.strip()))


@st.composite
def a_request(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(st.sampled_from(["str", "list"]))
    body: dict[str, object]
    if kind == "str":
        body = {"messages": draw(nonblank)}
    else:
        # "calls": an assistant message calling 1-2 tools, then their results.
        units = draw(st.lists(st.sampled_from(["user", "assistant", "calls"]), min_size=0, max_size=4))
        units.append(draw(st.sampled_from(["user", "user", "calls"])))
        msgs: list[dict[str, object]] = []
        if draw(st.booleans()):
            msgs.append({"role": "system", "content": draw(text)})
        for i, unit in enumerate(units):
            last = i == len(units) - 1  # a turn's input must not be blank
            if unit == "calls":
                ids = [f"call_{i}_{k}" for k in range(draw(st.integers(1, 2)))]
                calls = [
                    {"id": c, "type": "function", "function": {"name": "f", "arguments": draw(text)}}
                    for c in ids
                ]
                msgs.append({"role": "assistant", "content": draw(st.none() | text), "tool_calls": calls})
                for c in reversed(ids):
                    msgs.append(
                        {"role": "tool", "tool_call_id": c, "content": draw(nonblank if last else text)}
                    )
                continue
            m: dict[str, object] = {"role": unit, "content": draw(nonblank if last else text)}
            if draw(st.integers(0, 5)) == 0:
                m["name"] = draw(st.sampled_from(["ada", "tool_x", "名前"]))
            msgs.append(m)
        body = {"messages": msgs}
    body["max_new_tokens"] = draw(st.integers(min_value=1, max_value=120))
    keep = draw(st.sampled_from([None, 0, 1, 2]))
    if keep is not None:
        body["keep_first_rounds"] = keep
    body["model"] = draw(st.sampled_from(["cl", "cl", "o2"]))
    body["_resend"] = kind == "list" and draw(st.booleans())  # prefix the stored history
    return body


def registry(backend: RecordingBackend, cw_cl: int, cw_o2: int) -> ModelRegistry:
    return ModelRegistry(
        [
            ModelSpec(
                name="cl", backend=backend, context_window=cw_cl, max_new_tokens=1, encoding="cl100k_base"
            ),
            ModelSpec(
                name="o2", backend=backend, context_window=cw_o2, max_new_tokens=1, encoding="o200k_base"
            ),
        ]
    )


async def run_and_check(requests: list[dict[str, object]], cw_cl: int, cw_o2: int) -> None:
    backend = RecordingBackend(LocalBackend(reply=short_reply))
    store = MemoryStore()
    engine = Engine(store, registry(backend, cw_cl, cw_o2))
    windows = {"cl": cw_cl, "o2": cw_o2}
    encodings = {"cl": "cl100k_base", "o2": "o200k_base"}
    conv_uid: str | None = None
    for body in requests:
        before = await store.read_messages(conv_uid) if conv_uid else []
        conv = await store.get_conversation(conv_uid) if conv_uid else None
        sent_before = len(backend.requests)
        body = dict(body)
        if body.pop("_resend") and before:
            # The OpenAI SDK habit: the whole history, then the new messages.
            history = [
                m.model_dump(include={"role", "content", "name", "tool_call_id", "tool_calls"})
                for m in before
            ]
            body["messages"] = history + list(body["messages"])  # type: ignore[call-overload]
        try:
            reply = await engine.chat({**body, "conv_uid": conv_uid})
        except (ContextOverflowError, HistoryConflictError):
            # HistoryConflictError: messages with an assistant's among them,
            # on a conversation that has other ones, are a history that differs.
            after = await store.read_messages(conv_uid) if conv_uid else []
            assert after == before, "a refused turn stored something"
            continue
        conv_uid = reply.conv_uid
        assert len(backend.requests) == sent_before + 1
        gen: GenerationRequest = backend.requests[-1]
        model = str(body["model"])
        max_new = int(body["max_new_tokens"])  # type: ignore[call-overload]
        tokens = exact_prompt_tokens(gen.messages, encodings[model])
        # The invariant, counted independently with the model's encoding.
        assert tokens + max_new <= windows[model], (tokens, max_new, windows[model])
        assert reply.usage.prompt_tokens == tokens
        # History in the prompt: whole stored rounds only, a prefix (kept
        # first rounds) and a suffix (newest rounds).
        history = [m for m in gen.messages if isinstance(m, Message)]
        seqs = {m.seq for m in history}
        rounds = rounds_of(before)
        in_prompt = []
        for r in rounds:
            got = [m.seq in seqs for m in r]
            assert all(got) or not any(got), f"a round was split: {[m.seq for m in r]} vs {sorted(seqs)}"
            in_prompt.append(all(got))
        # rounds in prompt = head prefix + tail suffix
        k = 0
        while k < len(in_prompt) and in_prompt[k]:
            k += 1
        j = len(in_prompt)
        while j > k and in_prompt[j - 1]:
            j -= 1
        assert not any(in_prompt[k:j]), f"history is not head+tail: {in_prompt}"
        # Longest suffix: when counts are in the model's encoding and every
        # earlier input round made it in, the newest round left out must not fit.
        raw = body["messages"]
        given = 1 if isinstance(raw, str) else sum(1 for m in raw if m["role"] != "system")  # type: ignore[union-attr,index]
        assert reply.history_matched in (0, len(before))
        given -= reply.history_matched
        after = await store.read_messages(reply.conv_uid)
        assert len(after) == len(before) + given + 1, "a resent history was stored again"
        inputs_sent = sum(1 for m in gen.messages if not isinstance(m, Message) and m.role != "system")
        if inputs_sent < given:
            assert j == len(in_prompt) or k == len(in_prompt), (
                "stored rounds older than a dropped input round"
            )
        same_encoding = conv is None or conv.encoding == encodings[model]
        if same_encoding and inputs_sent == given and j > k:
            missing = rounds[j - 1]
            cost = sum(count_prompt_message(get_tokenizer(encodings[model]), m) for m in missing)
            assert tokens + cost + max_new > windows[model], (
                f"round {[m.seq for m in missing]} ({cost} tokens) would still fit: "
                f"{tokens}+{cost}+{max_new} <= {windows[model]}"
            )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(a_request(), min_size=1, max_size=8),
    st.integers(min_value=20, max_value=400),
    st.integers(min_value=20, max_value=400),
)
def test_engine_windows_keep_the_invariant_and_whole_rounds(
    requests: list[dict[str, object]], cw_cl: int, cw_o2: int
) -> None:
    asyncio.run(run_and_check(requests, cw_cl, cw_o2))


# -- targeted window cases -------------------------------------------------


def seed_turns(store: MemoryStore, conv_uid: str, pairs: Sequence[tuple[str, str]], encoding: str) -> None:
    tok = get_tokenizer(encoding)

    async def go() -> None:
        for i, (q, a) in enumerate(pairs):
            await store.append_turn(
                TurnWrite(
                    conv_uid=conv_uid,
                    turn_id=f"seed{i}",
                    messages=(
                        MessageDraft(
                            role="user",
                            content=q,
                            token_count=count_message(tok, "user", q),
                            starts_round=True,
                        ),
                        MessageDraft(
                            role="assistant", content=a, token_count=count_message(tok, "assistant", a)
                        ),
                    ),
                    encoding=encoding,
                    prompt_tokens=1,
                    completion_tokens=1,
                    created_at=1.0,
                )
            )

    return go()  # type: ignore[return-value]


async def test_window_after_switching_encoding_is_still_the_longest_suffix() -> None:
    backend = RecordingBackend()
    store = MemoryStore()
    reg = ModelRegistry(
        [
            ModelSpec(name="old", backend=backend, context_window=100_000, encoding="cl100k_base"),
            ModelSpec(
                name="new", backend=backend, context_window=2000, max_new_tokens=100, encoding="o200k_base"
            ),
        ]
    )
    engine = Engine(store, reg)
    tamil = "வணக்கம் நீங்கள் எப்படி இருக்கிறீர்கள் " * 3
    first = await engine.chat({"messages": tamil, "model": "old"})
    for i in range(40):
        await engine.chat({"messages": f"{tamil}{i}", "model": "old", "conv_uid": first.conv_uid})
    await engine.chat({"messages": "hi", "model": "new", "conv_uid": first.conv_uid})
    sent = backend.requests[-1].messages
    used = exact_prompt_tokens(sent, "o200k_base")
    history = [m for m in sent if isinstance(m, Message)]
    stored = await store.read_messages(first.conv_uid)
    older = [m for m in stored if m.seq in (history[0].seq - 2, history[0].seq - 1)]
    older_cost = sum(count_message(O2, m.role, m.content) for m in older)
    assert used + older_cost + 100 > 2000, (
        f"the prompt uses {used} of 1900 and the next older round ({older_cost}) fits"
    )


async def test_huge_keep_first_rounds_does_not_read_the_whole_history() -> None:
    class Spy(MemoryStore):
        read = 0

        async def read_messages(
            self, conv_uid: str, *, start_seq: int = 1, limit: int | None = None
        ) -> list[Message]:
            got = await super().read_messages(conv_uid, start_seq=start_seq, limit=limit)
            self.read += len(got)
            return got

    store = Spy()
    backend = RecordingBackend()
    engine = Engine(
        store, ModelRegistry([ModelSpec(name="m", backend=backend, context_window=300, max_new_tokens=50)])
    )
    await seed_turns(store, "c", [(f"q{i}", f"a{i}") for i in range(1000)], "cl100k_base")  # type: ignore[misc]
    await engine.chat({"messages": "hi", "conv_uid": "c", "keep_first_rounds": 10**9})
    window = len(backend.requests[-1].messages)
    # The window holds a few dozen messages; reading 2000 is reading it all.
    assert store.read < 10 * window, f"read {store.read} stored messages for a {window}-message window"


async def test_keep_first_rounds_with_tight_budget_keeps_invariant_and_whole_rounds() -> None:
    backend = RecordingBackend(LocalBackend(reply=short_reply))
    store = MemoryStore()
    engine = Engine(
        store,
        ModelRegistry([ModelSpec(name="m", backend=backend, context_window=120, max_new_tokens=20)]),
        keep_first_rounds=3,
    )
    first = await engine.chat({"messages": "first question with a few words in it"})
    for i in range(12):
        await engine.chat({"messages": f"follow up number {i} " + "x" * (i * 3), "conv_uid": first.conv_uid})
        sent = backend.requests[-1].messages
        assert exact_prompt_tokens(sent, "cl100k_base") + 20 <= 120
        hist = [m for m in sent if isinstance(m, Message)]
        # whole rounds: each user message in history is followed by its reply
        for a, b in zip(hist[::2], hist[1::2], strict=False):
            assert a.role == "user" and b.role == "assistant" and b.seq == a.seq + 1


async def test_scene_context_and_replaced_system_prompt_keep_the_invariant() -> None:
    class Ctx:
        name = "chat_ctx"
        needs_param = False

        async def prepare(self, request: SceneRequest) -> ScenePlan:
            return ScenePlan(
                system_prompt="You answer from the documents.",
                context=tuple(f"document {i}: " + "lorem ipsum " * (5 + i) for i in range(6)),
                max_context_share=0.9,
            )

        async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
            return reply

    backend = RecordingBackend(LocalBackend(reply=short_reply))
    engine = Engine(
        MemoryStore(),
        ModelRegistry([ModelSpec(name="m", backend=backend, context_window=400, max_new_tokens=64)]),
        scenes=[Ctx()],
    )
    conv = None
    for i in range(8):
        system = [{"role": "system", "content": "be terse " * (i * 4)}] if i % 2 == 0 else []
        r = await engine.chat(
            {
                "messages": [*system, {"role": "user", "content": f"q{i} " * 10}],
                "conv_uid": conv,
                "chat_mode": "chat_ctx",
            }
        )
        conv = r.conv_uid
        sent = backend.requests[-1].messages
        assert exact_prompt_tokens(sent, "cl100k_base") + 64 <= 400
        systems = [m for m in sent if m.role == "system"]
        assert sent[: len(systems)] == tuple(systems), "system messages come first"
        if system:
            assert any(m.content == system[0]["content"] for m in systems)


@pytest.mark.parametrize("max_new", [8192, 8193, 10**30])
async def test_reply_budget_at_or_above_the_window_is_refused_and_stores_nothing(max_new: int) -> None:
    store = MemoryStore()
    engine = Engine(
        store, ModelRegistry([ModelSpec(name="m", backend=RecordingBackend(), context_window=8192)])
    )
    with pytest.raises(ContextOverflowError) as err:
        await engine.chat({"messages": "hi", "max_new_tokens": max_new, "request_id": "r"})
    assert str(max_new) in str(err.value)
    assert await store.list_conversations() == []


async def test_huge_single_message_overflows_with_numbers_and_is_fast() -> None:
    store = MemoryStore()
    backend = RecordingBackend()
    engine = Engine(store, ModelRegistry([ModelSpec(name="m", backend=backend, context_window=8192)]))
    with pytest.raises(ContextOverflowError) as err:
        await engine.chat({"messages": "a" * 400_000})
    assert err.value.required_tokens > 8192 and "8192" in str(err.value)
    assert backend.requests == [] and await store.list_conversations() == []


async def test_prior_exchanges_on_a_new_conversation_and_several_user_messages() -> None:
    backend = RecordingBackend(LocalBackend(reply=short_reply))
    store = MemoryStore()
    engine = Engine(
        store, ModelRegistry([ModelSpec(name="m", backend=backend, context_window=40, max_new_tokens=10)])
    )
    msgs = [
        {"role": "user", "content": "one " * 10},
        {"role": "assistant", "content": "two " * 10},
        {"role": "user", "content": "three"},
        {"role": "user", "content": "four"},
    ]
    r = await engine.chat({"messages": msgs})
    sent = backend.requests[-1].messages
    # the last round (two user messages) is the input; the earlier round did not fit
    assert [m.content for m in sent] == ["three", "four"]
    assert exact_prompt_tokens(sent, "cl100k_base") + 10 <= 40
    stored = await store.read_messages(r.conv_uid)
    assert [m.content for m in stored[:4]] == [m["content"] for m in msgs]
    assert [m.starts_round for m in stored] == [True, False, True, False, False]
