"""The engine's observation hooks: each part of a turn is one span, the
first streamed token an event, and the turn's facts annotations; without
an observer nothing is recorded and nothing fails."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from convcore import DEFAULT_MODEL, Engine, MemoryStore, StorageUnavailableError, default_registry
from convcore.observe import Attr, observing

pytestmark = pytest.mark.anyio


class Recorded:
    def __init__(self, name: str, attributes: Mapping[str, Attr]) -> None:
        self.name = name
        self.attributes = dict(attributes)
        self.events: list[str] = []
        self.error: str | None = None

    def set_attribute(self, key: str, value: Attr) -> None:
        self.attributes[key] = value

    def add_event(self, name: str) -> None:
        self.events.append(name)


class Recorder:
    def __init__(self) -> None:
        self.spans: list[Recorded] = []
        self.facts: dict[str, Attr] = {}

    @contextmanager
    def start_span(self, name: str, attributes: Mapping[str, Attr]) -> Iterator[Recorded]:
        span = Recorded(name, attributes)
        self.spans.append(span)
        try:
            yield span
        except BaseException as exc:
            span.error = type(exc).__name__
            raise

    def annotate(self, attributes: Mapping[str, Attr]) -> None:
        self.facts.update(attributes)


async def test_a_turn_is_prepare_read_generate_append_and_says_what_it_was() -> None:
    engine = Engine(MemoryStore(), default_registry())
    rec = Recorder()
    with observing(rec):
        await engine.chat({"messages": "hi", "conv_uid": "c", "span_id": "span-7"})
    assert [s.name for s in rec.spans] == [
        "convcore.prepare",
        "convcore.store.read",
        "convcore.generate",
        "convcore.store.append",
    ]
    assert rec.facts["outcome"] == "ok" and rec.facts["chat_mode"] == "chat_normal"
    assert rec.facts["span_id"] == "span-7"
    assert rec.facts["model"] == DEFAULT_MODEL
    assert isinstance(rec.facts["prompt_tokens"], int) and isinstance(rec.facts["completion_tokens"], int)


async def test_a_stream_marks_its_first_token_and_a_retry_is_a_duplicate() -> None:
    engine = Engine(MemoryStore(), default_registry())
    rec = Recorder()
    with observing(rec):
        async for _ in engine.chat_stream({"messages": "hi", "conv_uid": "s", "request_id": "r"}):
            pass
    generate = next(s for s in rec.spans if s.name == "convcore.generate")
    assert generate.events == ["first_token"] and rec.facts["outcome"] == "ok"
    again = Recorder()
    with observing(again):
        await engine.chat({"messages": "hi", "conv_uid": "s", "request_id": "r"})
    assert again.facts["outcome"] == "duplicate"


async def test_a_failing_store_read_is_a_failed_span() -> None:
    class Down(MemoryStore):
        async def read_context(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            raise StorageUnavailableError("down")

    engine = Engine(Down(), default_registry())
    rec = Recorder()
    with observing(rec), pytest.raises(StorageUnavailableError):
        await engine.chat({"messages": "hi", "conv_uid": "d"})
    assert [(s.name, s.error) for s in rec.spans] == [
        ("convcore.prepare", "StorageUnavailableError"),
        ("convcore.store.read", "StorageUnavailableError"),
    ]


async def test_without_an_observer_turns_run_as_before() -> None:
    engine = Engine(MemoryStore(), default_registry())
    done = await engine.chat({"messages": "hi"})
    assert done.choices[0].message.content == "You said: hi"
