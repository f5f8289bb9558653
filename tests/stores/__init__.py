"""Store factories for the contract suite, one module per adapter.

Each module exposes ``FACTORY_PARAMS``: a list of ``pytest.param(opener)``
where ``opener()`` is an async context manager yielding a :class:`StoreFactory`
for one test. Its ``make()`` returns a new storage object on the same isolated
namespace (callable from any event loop or thread, so several loops can race
on one conversation); ``make_other()`` one on a second namespace of the same
server (another prefix), for isolation tests; ``cleanup()`` removes both
namespaces' data. Every storage is opened by ``open_store(url)``, as users
open it: fakeredis, which has no URL, passes its client to the same call
(``open_store("redis://?prefix=…", client=fake)``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from convcore import Storage

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@dataclass
class StoreFactory:
    """Builds stores that share one namespace on one backend."""

    name: str
    make: Callable[[], Storage]
    cleanup: Callable[[], Awaitable[None]]
    make_other: Callable[[], Storage]
    cross_process: bool = False  # stores from make() in other processes see the same data
    url: str | None = None  # a URL open_store() accepts for this namespace, if any
    extra: dict[str, object] = field(default_factory=dict)


def unavailable(reason: str) -> None:
    """Skip with ``reason`` on a developer machine; fail in CI, where every
    server must be up."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


MODULES = ["tests.stores.memory", "tests.stores.redis", "tests.stores.sql"]


def all_factory_params() -> list[object]:
    params: list[object] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that adapter's factories are not written yet
            raise
        params.extend(module.FACTORY_PARAMS)
    return params
