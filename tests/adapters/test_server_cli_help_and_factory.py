"""``convcore serve --help`` shows each default once under the command typed;
``app_factory`` builds a worker's app from ``$CONVCORE_SERVE_ARGV``."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import httpx
import pytest

from convcore_server import cli
from convcore_server.cli import ARGV_ENV, UsageError, app_factory

pytestmark = pytest.mark.anyio


def _option_blocks(text: str) -> dict[str, str]:
    """Each option's help, joined onto one line, by its first flag."""
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.strip()}


def test_serve_help_shows_each_default_once() -> None:
    text = cli._parser().format_help()
    blocks = _option_blocks(text)
    for block in blocks.values():
        assert block.count("default") <= 1, block
    valued = [
        "--host", "--port", "--store", "--local-latency", "--local-tokens-per-second", "--max-body-bytes",
        "--max-message-chars", "--max-inline-bytes", "--header-timeout", "--body-timeout",
        "--max-connections", "--docs", "--ready-timeout", "--log-format", "--workers", "--log-level",
    ]  # fmt: skip
    for flag in valued:
        assert "default" in blocks[flag], blocks[flag]
    assert "(default: 4194304)" in blocks["--max-body-bytes"] and "(default: info)" in blocks["--log-level"]
    assert "``" not in text and "issue" not in text.lower()


@pytest.mark.parametrize(
    ("argv0", "typed"),
    [("/usr/bin/convcore", "convcore serve"), ("/x/convcore/__main__.py", "python -m convcore serve")],
)
def test_serve_usage_names_the_command_typed(monkeypatch: pytest.MonkeyPatch, argv0: str, typed: str) -> None:
    monkeypatch.setattr("sys.argv", [argv0, "serve", "--help"])
    assert cli._parser().format_usage().startswith(f"usage: {typed} ")


async def test_app_factory_serves_from_the_arguments_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = tmp_path / "worker.db"
    monkeypatch.setenv(ARGV_ENV, f'["--no-auth", "--store", "sqlite:///{store}", "--no-metrics"]')
    app = app_factory()
    store_of = app.state.convcore.engine.store
    closed: list[bool] = []
    close = store_of.aclose

    async def spy_close() -> None:
        closed.append(True)
        await close()

    store_of.aclose = spy_close
    gc.unfreeze()
    async with app.router.lifespan_context(app):
        # What starting made is kept out of the collector's full passes.
        assert gc.get_freeze_count() > 0
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w.test") as c:
            r = await c.post("/api/v2/chat/completions", json={"messages": "hi", "conv_uid": "w1"})
            metrics = await c.get("/metrics")
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You said: hi"
        assert metrics.status_code == 404  # --no-metrics reached the worker's app
    assert closed == [True], "the worker's lifespan closes its engine, and with it the store"
    assert store.exists()


@pytest.mark.parametrize("raw", ["not json", '{"a": 1}', '["--no-auth", 3]'])
def test_app_factory_refuses_arguments_that_are_not_a_json_list_of_strings(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv(ARGV_ENV, raw)
    with pytest.raises(UsageError, match=ARGV_ENV):
        app_factory()


async def test_serve_keeps_its_startup_objects_out_of_full_collections(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    frozen: list[int] = []

    async def run(uvicorn: object, app: object, opts: object, models: str) -> int:
        frozen.append(gc.get_freeze_count())
        return 0

    monkeypatch.setattr(cli, "_run", run)
    gc.unfreeze()  # counted from nothing frozen (the suite's fixture thaws after each test)
    opts = cli.parse_args(["--no-auth", "--store", f"sqlite:///{tmp_path / 'one.db'}"])
    assert await cli.serve(opts) == 0
    assert frozen and frozen[0] > 0
