"""The core stays framework-free, and its public API is what __all__ says."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import convcore

BLOCKED = [
    "redis",
    "sqlalchemy",
    "sqlmodel",
    "httpx",
    "fastapi",
    "starlette",
    "uvicorn",
    "aiohttp",
    "asyncpg",
    "opentelemetry",
    "prometheus_client",
]


def test_import_convcore_loads_no_driver_or_framework() -> None:
    """With every adapter dependency made unimportable, the core still imports
    and runs a turn on the memory store."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {BLOCKED!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        import asyncio, convcore
        async def main():
            engine = convcore.Engine(convcore.MemoryStore(), convcore.default_registry())
            reply = await engine.chat({{"messages": "hi"}})
            assert reply.content == "You said: hi", reply
        asyncio.run(main())
        leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
        assert not leaked, leaked
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_all_matches_the_public_names() -> None:
    public = {
        n for n in vars(convcore) if not n.startswith("_") and not isinstance(getattr(convcore, n), type(sys))
    }
    assert set(convcore.__all__) - {"__version__"} == public
    for name in convcore.__all__:
        assert hasattr(convcore, name), name


def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from convcore import MissingDependencyError, open_store

    monkeypatch.setitem(sys.modules, "convcore_redis", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r'pip install "convcore\[redis\]"'):
        open_store("redis://127.0.0.1:6379/0")


def test_unknown_store_scheme_is_a_clear_error() -> None:
    from convcore import InvalidRequestError, open_store

    with pytest.raises(InvalidRequestError, match="unsupported store URL scheme 'ftp'"):
        open_store("ftp://x")


def test_py_typed_is_shipped() -> None:
    from pathlib import Path

    assert (Path(convcore.__file__).parent / "py.typed").exists()
