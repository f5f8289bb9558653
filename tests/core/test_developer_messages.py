"""``developer`` messages are conversation instructions, sent under the role the model takes."""

from __future__ import annotations

import pytest

from convcore import Engine, InvalidRequestError, MemoryStore, ModelRegistry, ModelSpec
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, count_message, get_tokenizer

pytestmark = pytest.mark.anyio

TOK = get_tokenizer("o200k_base")


def engine_for(model: str, **spec: object) -> tuple[Engine, RecordingBackend]:
    backend = RecordingBackend()
    registry = ModelRegistry([ModelSpec(name=model, backend=backend, context_window=8192, **spec)])  # type: ignore[arg-type]
    return Engine(MemoryStore(), registry), backend


def prompt_tokens(messages: object) -> int:
    return REPLY_PRIMING_TOKENS + sum(count_message(TOK, m.role, m.content, m.name) for m in messages)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("model", "sent_as"),
    [("gpt-4o-mini", "system"), ("o3-mini", "developer"), ("gpt-5", "developer"), ("o1", "developer")],
)
async def test_a_developer_message_is_sent_under_the_models_instruction_role(
    model: str, sent_as: str
) -> None:
    engine, backend = engine_for(model)
    reply = await engine.chat(
        {
            "messages": [
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Hi"},
            ]
        }
    )
    sent = backend.requests[-1].messages
    assert [(m.role, m.content) for m in sent] == [(sent_as, "Answer in French."), ("user", "Hi")]
    assert reply.usage.prompt_tokens == prompt_tokens(sent), "counted as sent, by the same rule"


async def test_a_system_message_goes_to_a_reasoning_model_as_developer() -> None:
    engine, backend = engine_for("o3-mini")
    reply = await engine.chat(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    )
    sent = backend.requests[-1].messages
    assert sent[0].role == "developer"
    assert reply.usage.prompt_tokens == prompt_tokens(sent)


async def test_the_instruction_role_is_configurable() -> None:
    engine, backend = engine_for("my-o3-on-vllm", instruction_role="system", encoding="o200k_base")
    await engine.chat(
        {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "Hi"}]}
    )
    assert backend.requests[-1].messages[0].role == "system"


async def test_developer_messages_are_conversation_state_like_system_ones() -> None:
    engine, backend = engine_for("gpt-4o-mini")
    first = await engine.chat(
        {
            "messages": [
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Hi"},
            ]
        }
    )
    conv = await engine.get_conversation(first.conv_uid)
    assert [(m.role, m.content) for m in conv.system] == [("developer", "Answer in French.")]
    assert [m.role for m in await engine.read_messages(first.conv_uid)] == ["user", "assistant"]
    await engine.chat({"messages": "Again", "conv_uid": first.conv_uid})
    assert backend.requests[-1].messages[0].content == "Answer in French.", "kept for later turns"
    await engine.chat(
        {
            "messages": [
                {"role": "developer", "content": "Answer in German."},
                {"role": "user", "content": "Hi"},
            ],
            "conv_uid": first.conv_uid,
        }
    )
    conv = await engine.get_conversation(first.conv_uid)
    assert [m.content for m in conv.system] == ["Answer in German."], "replaced, not piled up"
    assert [m.role for m in backend.requests[-1].messages].count("system") == 1


async def test_only_developer_messages_are_not_a_turn() -> None:
    engine, _ = engine_for("gpt-4o-mini")
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat({"messages": [{"role": "developer", "content": "x"}]})
    assert info.value.field == "messages"
