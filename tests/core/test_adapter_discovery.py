"""The core finds adapters through entry points and names none of them.

Store schemes, model backends and ``convcore`` subcommands come from the
``convcore.stores`` / ``convcore.backends`` / ``convcore.commands`` groups;
a missing driver still fails naming the extra to install.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from convcore import MissingDependencyError, open_store, plugins
from convcore.cli import main as convcore_main
from convcore.model_config import parse_models

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "convcore"


def _adapter_packages() -> list[str]:
    """Every package the wheel ships besides the core (adapters, the benchmarks),
    by its installed name, and the benchmarks' folder name in the repository."""
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    renamed = wheel.get("sources", {})
    names = {"benchmarks"}
    for path in wheel["only-include"]:
        names.add(renamed.get(path, Path(path).name))
    return sorted(names - {"convcore"})


ADAPTERS = _adapter_packages()


def test_the_adapter_list_is_not_empty() -> None:
    assert {"convcore_sql", "convcore_redis", "convcore_openai", "convcore_server", "convcore_bench"} <= set(
        ADAPTERS
    )


def _names_an_adapter(text: str) -> str | None:
    for name in ADAPTERS:
        # A module path (``convcore_sql``, ``benchmarks.cli``), not the English word "benchmarks".
        pattern = rf"\b{name}\b" if name.startswith("convcore_") else rf"(?<![\w.]){name}\.\w"
        if re.search(pattern, text) or text == name:
            return name
    return None


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_names_no_adapter(path: Path) -> None:
    """Neither an import nor a string (docstrings included) in convcore/ names
    an adapter package: adapters are found through entry points."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _names_an_adapter(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and _names_an_adapter(node.module):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for line in node.value.splitlines() or [node.value]:
                if _names_an_adapter(line.strip()):
                    found.append((node.lineno, line.strip()))
    assert not found, f"{path.relative_to(ROOT)} names adapters: {found}"


def test_the_scan_catches_what_it_looks_for() -> None:
    assert _names_an_adapter("convcore_sql") == "convcore_sql"
    assert _names_an_adapter("from convcore_redis.records import X") == "convcore_redis"
    assert _names_an_adapter("benchmarks.cli") == "benchmarks"
    assert _names_an_adapter("convcore_bench.cli") == "convcore_bench"
    assert _names_an_adapter("run load benchmarks") is None
    assert _names_an_adapter("convcore_sqlite_file") is None


def test_every_store_scheme_and_command_is_registered() -> None:
    schemes = plugins.names(plugins.STORES)
    assert {"sqlite", "postgresql", "postgres", "mysql", "mariadb", "redis", "rediss"} <= set(schemes)
    assert {"redis+cluster", "rediss+cluster"} <= set(schemes)
    for scheme in schemes:
        assert hasattr(plugins.load(plugins.STORES, scheme, scheme), "from_url"), scheme
    assert plugins.names(plugins.BACKENDS) == ["openai"]
    assert {"serve", "bench"} <= set(plugins.names(plugins.COMMANDS))
    for command in plugins.names(plugins.COMMANDS):
        assert callable(plugins.load(plugins.COMMANDS, command, command))


def test_unknown_names_load_nothing() -> None:
    assert plugins.load(plugins.STORES, "nosuch", "x") is None


def test_help_lists_the_registered_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        convcore_main(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "bench" in out and "demo" in out


@pytest.mark.parametrize(
    ("blocked", "url", "extra"),
    [("sqlalchemy", "sqlite:///x.db", "sql"), ("redis", "redis+cluster://127.0.0.1:1", "redis")],
)
def test_a_missing_driver_names_the_extra(blocked: str, url: str, extra: str) -> None:
    """The adapter is installed but its driver is not: the error says which
    extra brings it (a fresh interpreter, so nothing is imported yet)."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == {blocked!r}:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from convcore import MissingDependencyError, open_store
        try:
            open_store({url!r})
        except MissingDependencyError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f'pip install "convcore[{extra}]"' in out.stdout


def test_a_missing_backend_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "convcore_openai", None)
    with pytest.raises(MissingDependencyError) as info:
        parse_models(
            [{"name": "m", "backend": "openai", "base_url": "http://127.0.0.1:1", "context_window": 100}]
        )
    assert 'pip install "convcore[openai]"' in str(info.value)


def test_a_missing_command_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "convcore_server", None)
    monkeypatch.setitem(sys.modules, "convcore_server.cli", None)
    assert convcore_main(["serve", "--help"]) == 2
    assert 'pip install "convcore[server]"' in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["rich", "httpx"])
def test_bench_without_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    for name in [m for m in sys.modules if m == "convcore_bench" or m.startswith("convcore_bench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)
    assert convcore_main(["bench", "w1"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "convcore[bench]"' in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["", "load"])
def test_bench_help_shows_each_default_once_under_the_command_typed(command: str) -> None:
    from convcore_bench import cli, loadcli

    typed = f"convcore bench {command}".strip()
    text = (loadcli if command else cli).build_parser(typed).format_help()
    assert text.startswith(f"usage: {typed} ")
    for line in text.splitlines():
        assert line.count("default") <= 1, line
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "(default: True)" not in flat and "(default: [])" not in flat
    if not command:
        assert "(default: 1,8,64)" in flat  # as typed, not a Python list
        assert "skip the floors (no ratios)" in flat and "(no ratios) (default" not in flat
    assert "issue" not in text.lower()


async def test_the_store_opens_through_its_entry_point(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert type(store) is plugins.load(plugins.STORES, "sqlite", "the sqlite store")
    finally:
        await store.aclose()
