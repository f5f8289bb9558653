"""The blocking facade, shared by many threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from convcore import Engine, MemoryStore, SyncEngine, default_registry
from convcore.audit import audit_messages


def test_sync_chat_and_stream() -> None:
    with SyncEngine(lambda: Engine(MemoryStore(), default_registry())) as engine:
        first = engine.chat({"messages": "hi"})
        chunks = list(engine.chat_stream({"messages": "again", "conv_uid": first.conv_uid}))
        assert chunks[-1].usage is not None
        assert len(engine.read_messages(first.conv_uid)) == 4
        assert engine.get_conversation(first.conv_uid).message_count == 4


def test_leaving_a_sync_stream_early_stores_nothing() -> None:
    with SyncEngine(lambda: Engine(MemoryStore(), default_registry())) as engine:
        stream = engine.chat_stream({"messages": "abandon this one", "conv_uid": "c"})
        next(stream)
        next(stream)
        stream.close()
        assert engine.list_conversations() == []


def test_100_threads_on_one_conversation() -> None:
    with SyncEngine(lambda: Engine(MemoryStore(), default_registry())) as engine:
        with ThreadPoolExecutor(max_workers=16) as pool:
            ids = [f"r{i}" for i in range(100)]
            list(
                pool.map(lambda r: engine.chat({"messages": f"q-{r}", "conv_uid": "t", "request_id": r}), ids)
            )
        report = audit_messages(engine.read_messages("t"), expected_turns=ids, unique_inputs=True)
        assert report.ok and report.turns == 100


def test_sync_fork_and_resent_history() -> None:
    with SyncEngine(lambda: Engine(MemoryStore(), default_registry())) as engine:
        first = engine.chat({"messages": "one"})
        history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": first.content}]
        second = engine.chat(
            {"messages": [*history, {"role": "user", "content": "two"}], "conv_uid": first.conv_uid}
        )
        assert second.history_matched == 2 and second.trim is not None
        fork = engine.fork(first.conv_uid, 2)
        assert fork.message_count == 2 and len(engine.read_messages(first.conv_uid)) == 4
