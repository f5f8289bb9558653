"""Pointing convcore at an OpenAI-compatible server: ``CONVCORE_MODELS`` (or a
models file) is honoured by ``open_engine``, ``convcore demo`` and ``convcore
serve``. The server here is the loopback upstream (tests/backends/fake_upstream.py):
no pip package provides an OpenAI-compatible server that runs without model
weights, so a real model server cannot run in the test suite."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from convcore import cli, open_engine
from convcore.bootstrap import DEFAULT_MODEL, LEGACY_MODEL_ALIAS, default_registry
from tests.backends.fake_upstream import get_upstream
from tests.e2e.serve_support import KEYS, serve

pytestmark = pytest.mark.anyio


def models_json(name: str = "remote", upstream: str = "echo") -> str:
    base_url = get_upstream().base_url
    return json.dumps(
        [
            {
                "name": name,
                "backend": "openai",
                "base_url": base_url,
                "upstream": upstream,
                "context_window": 4096,
            }
        ]
    )


async def test_open_engine_honours_convcore_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVCORE_MODELS", models_json())
    async with open_engine("memory://") as engine:
        assert [s.name for s in engine.models] == ["remote"]
        first = await engine.chat({"messages": "my name is Ada"})
        second = await engine.chat({"messages": "who am I?", "conv_uid": first.conv_uid})
    assert first.model == "remote"
    assert second.content == "You said: who am I? (earlier user messages: 1; first: 'my name is Ada')"


async def test_open_engine_takes_a_models_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVCORE_MODELS", raising=False)
    path = tmp_path / "models.json"
    path.write_text(models_json("from-file"))
    async with open_engine("memory://", models=str(path)) as engine:
        assert (await engine.chat({"messages": "hi"})).model == "from-file"
    async with open_engine("memory://") as engine:
        assert [s.name for s in engine.models] == [DEFAULT_MODEL]


def test_demo_talks_to_the_models_of_convcore_models(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONVCORE_MODELS", models_json())
    assert cli.main(["demo", "--store", "memory://"]) == 0
    out = capsys.readouterr().out
    assert "model: remote (upstream 'echo'" in out
    assert "echo model" not in out
    history = [ex.body["messages"] for ex in get_upstream().history if ex.model == "echo"][-1]
    assert history[0] == {"role": "system", "content": "You are a concise assistant."}


def test_demo_says_the_built_in_model_only_echoes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CONVCORE_MODELS", raising=False)
    assert cli.main(["demo", "--store", "memory://"]) == 0
    out = capsys.readouterr().out
    assert f"model: {DEFAULT_MODEL}" in out and "echo model repeats your input" in out


def test_the_echo_model_keeps_its_old_name() -> None:
    registry = default_registry()
    assert [s.name for s in registry] == [DEFAULT_MODEL] == ["convcore-echo"]
    assert LEGACY_MODEL_ALIAS in registry and registry.get(LEGACY_MODEL_ALIAS).name == DEFAULT_MODEL


def test_serve_process_with_convcore_models_runs_the_sdk_tool_loop(tmp_path: Path) -> None:
    """A real ``convcore serve`` process, its model a loopback OpenAI-compatible
    server, named only by CONVCORE_MODELS; the SDK's tool loop by conv_uid."""
    models = models_json("agent", "echo;tools=1")
    with (
        serve(tmp_path, "--compaction", environ={"CONVCORE_MODELS": models}) as server,
        openai.OpenAI(base_url=server.api, api_key=KEYS[0]) as client,
    ):
        assert [m.id for m in client.models.list().data] == ["agent"]
        first = client.chat.completions.create(
            model="agent", messages=[{"role": "user", "content": "look it up"}]
        )
        calls = first.choices[0].message.tool_calls
        assert first.choices[0].finish_reason == "tool_calls" and calls is not None
        conv_uid = (first.model_extra or {})["conv_uid"]
        done = client.chat.completions.create(
            model="agent",
            messages=[{"role": "tool", "tool_call_id": calls[0].id, "content": "42"}],
            extra_body={"conv_uid": conv_uid},
        )
        assert done.choices[0].message.content == "Answer from 1 tool results: 42"
        # --compaction: a request may ask for it (without the flag, a 400).
        compacted = client.chat.completions.create(
            model="agent",
            messages=[{"role": "user", "content": "again"}],
            extra_body={"conv_uid": conv_uid, "compact": True},
        )
        assert compacted.choices[0].finish_reason == "tool_calls"
