"""SyncEngine, open_store URLs, the model config, the CLI."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from convcore import (
    ConvcoreError,
    ConversationNotFoundError,
    Engine,
    InvalidRequestError,
    MemoryStore,
    MissingDependencyError,
    ModelRegistry,
    ModelSpec,
    PermissionDeniedError,
    SyncEngine,
    cli,
    get_tokenizer,
    open_store,
)
from convcore.model_config import parse_models
from convcore.testing import RecordingBackend


def sync_engine(backend: RecordingBackend | None = None) -> tuple[SyncEngine, RecordingBackend]:
    backend = backend or RecordingBackend()
    reg = ModelRegistry([ModelSpec(name="m", backend=backend, context_window=8192)])
    return SyncEngine(lambda: Engine(MemoryStore(), reg)), backend


# -- SyncEngine ------------------------------------------------------------------


def test_close_twice_and_context_manager() -> None:
    eng, _ = sync_engine()
    with eng:
        assert eng.chat({"messages": "hi"}).content == "You said: hi"
    eng.close()
    eng.close()


def test_use_after_close_is_a_clear_error_without_leaking_a_coroutine() -> None:
    eng, _ = sync_engine()
    eng.close()
    raised: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            eng.chat({"messages": "hi"})
        except BaseException as exc:
            raised = exc
        kind, text = type(raised), str(raised)
        del raised
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert issubclass(kind, ConvcoreError) and "closed" in text, (kind, text)
    assert not leaked, leaked


def test_failing_factory_leaves_no_thread_behind() -> None:
    def broken() -> Engine:
        raise InvalidRequestError("bad config", field="models")

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(InvalidRequestError):
        SyncEngine(broken)
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.name == "convcore-sync"]
    assert leaked == []


def test_exceptions_keep_their_type_across_the_thread() -> None:
    with sync_engine()[0] as eng:
        mine = eng.chat({"messages": "x", "user_name": "ann"})
        with pytest.raises(InvalidRequestError) as info:
            eng.chat({"messages": "x", "temperature": 9})
        assert info.value.field == "temperature"
        with pytest.raises(PermissionDeniedError):
            eng.chat({"messages": "y", "conv_uid": mine.conv_uid, "user_name": "bob"})
        with pytest.raises(PermissionDeniedError):
            list(eng.chat_stream({"messages": "y", "conv_uid": mine.conv_uid, "user_name": "bob"}))
        with pytest.raises(ConversationNotFoundError):
            eng.get_conversation("missing")
        assert eng.delete_conversation("missing") is False


def test_sync_stream_dropped_without_close_stores_nothing_and_closes_the_backend() -> None:
    backend = RecordingBackend()
    with sync_engine(backend)[0] as eng:
        it = eng.chat_stream({"messages": "one two three four", "conv_uid": "c"})
        next(it)
        next(it)
        del it  # no close(), no loop exhaustion
        gc.collect()
        assert eng.list_conversations() == []
        assert backend.closed_streams == 1


def test_many_threads_mixing_chat_stream_and_reads() -> None:
    with sync_engine()[0] as eng:
        first = eng.chat({"messages": "start", "conv_uid": "shared"})

        def work(i: int) -> int:
            if i % 3 == 0:
                chunks = list(eng.chat_stream({"messages": f"s{i}", "conv_uid": "shared"}))
                assert chunks[-1].choices[0].finish_reason == "stop"
            elif i % 3 == 1:
                eng.chat({"messages": f"c{i}", "conv_uid": "shared", "serialize": True})
            else:
                eng.read_messages("shared")
                eng.list_conversations()
            return i

        with ThreadPoolExecutor(max_workers=16) as pool:
            assert sorted(pool.map(work, range(48))) == list(range(48))
        msgs = eng.read_messages(first.conv_uid)
        assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))
        users = [m.content for m in msgs if m.role == "user"]
        assert len(users) == 1 + 32 and len(set(users)) == len(users)
        for a, b in zip(msgs[::2], msgs[1::2], strict=True):
            assert a.role == "user" and b.role == "assistant" and a.turn_id == b.turn_id


# -- open_store ------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", "memory:", "chats.db", "nosuch://x", "http://host/db", "memory+x://"])
def test_bad_store_urls_are_invalid_requests(url: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        open_store(url)
    assert info.value.field == "store_url"


def test_memory_scheme_is_case_insensitive() -> None:
    assert isinstance(open_store("MEMORY://"), MemoryStore)


def test_unknown_sql_driver_is_a_convcore_error() -> None:
    with pytest.raises(ConvcoreError):
        open_store("postgresql+nosuchdriver://u@localhost/db")


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [("redis://localhost:6379/0", "convcore_redis", "redis"), ("sqlite:///x.db", "convcore_sql", "sql")],
)
def test_missing_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError) as info:
        open_store(url)
    assert f'pip install "convcore[{extra}]"' in str(info.value)
    assert isinstance(info.value, ImportError)


# -- model config --------------------------------------------------------------


def test_unknown_encoding_in_the_models_file_is_refused_at_load() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_models([{"name": "x", "backend": "local", "context_window": 1000, "encoding": "o200k"}])
    assert info.value.field == "models[0].encoding"


def test_local_model_with_o200k_reports_o200k_usage() -> None:
    reg = parse_models([{"name": "x", "backend": "local", "context_window": 4000, "encoding": "o200k_base"}])

    async def go() -> None:
        reply = await Engine(MemoryStore(), reg).chat({"messages": "你好世界🎉" * 20})
        assert reply.usage.completion_tokens == get_tokenizer("o200k_base").count(reply.content)

    asyncio.run(go())


# -- CLI -------------------------------------------------------------------------


def test_demo_on_memory_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--store", "memory://"]) == 0
    out = capsys.readouterr().out
    assert "turn 3 assistant" in out and "streamed turn 4" in out


def test_demo_with_a_bad_store_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--store", "nosuch://x"]) == 2
    assert "store_url" in capsys.readouterr().err


def test_serve_without_the_extra_is_a_clean_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "convcore_server.cli", None)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "convcore serve" in err and 'pip install "convcore[server]"' in err


def test_demo_on_a_sqlite_file(tmp_path: Path) -> None:
    assert cli.main(["demo", "--store", f"sqlite:///{tmp_path / 'demo.db'}"]) == 0
