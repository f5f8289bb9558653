"""Minted ids are what ``uuid.uuid4().hex`` gives: 32 lowercase hex digits
with version 4 and RFC 4122's variant, and never the same twice."""

from __future__ import annotations

import uuid

import pytest

from convcore import Engine, LocalBackend, MemoryStore, ModelRegistry, ModelSpec
from convcore.ids import random_id


def test_a_minted_id_is_a_version_4_uuid_in_hex() -> None:
    for _ in range(1000):
        minted = random_id()
        parsed = uuid.UUID(hex=minted)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert minted == parsed.hex  # 32 lowercase hex digits, no dashes


def test_minted_ids_differ() -> None:
    assert len({random_id() for _ in range(10_000)}) == 10_000


@pytest.mark.anyio
async def test_the_engine_mints_its_conversations_and_turns_so() -> None:
    store = MemoryStore()
    engine = Engine(store, ModelRegistry([ModelSpec(name="m", backend=LocalBackend(), context_window=4096)]))
    reply = await engine.chat({"messages": "hello"})
    assert reply.conv_uid is not None
    stored = await store.read_messages(reply.conv_uid)
    for minted in (reply.conv_uid, stored[0].turn_id):
        assert uuid.UUID(hex=minted).version == 4 and minted == uuid.UUID(hex=minted).hex
