"""Backend factories for the contract suite, one module per backend.

Each module exposes ``FACTORY_PARAMS``: a list of ``pytest.param`` holding
an async context manager that yields a :class:`BackendFactory`. ``make()``
builds a new backend (the fixture closes it); the model names say what to
ask for, since a backend answers whatever its upstream serves.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from convcore import ModelBackend


@dataclass(frozen=True)
class Misbehaviour:
    """Ways real servers misbehave, combined as asked.

    ``ignore_budget``: the reply runs far past ``max_new_tokens``;
    ``fail_before_first_token``: a rate limit (429) before anything is sent;
    ``fail_after_tokens``: the reply breaks off after that many pieces (a
    whole reply, which has no pieces, fails outright).
    """

    ignore_budget: bool = False
    fail_before_first_token: bool = False
    fail_after_tokens: int | None = None


@dataclass
class BackendFactory:
    """Builds backends of one kind and says how to observe them."""

    name: str
    make: Callable[[], ModelBackend]
    model: str  # an upstream model that answers deterministically, like LocalBackend
    slow_model: str  # the same replies, paced so a stream can be closed half-way
    # Waits (bounded) until the backend has observed that the generation of
    # ``request_id`` stopped before its end, and fails if it does not.
    assert_stopped_early: Callable[[str], Awaitable[None]]
    # A backend (closed by the caller) serving ``model`` with these faults.
    misbehaving: Callable[[Misbehaviour], ModelBackend]
    unknown_model: str | None = None  # None: the backend answers any model name


MODULES = ["tests.backends.local", "tests.backends.openai"]


def all_factory_params() -> list[object]:
    params: list[object] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        params.extend(module.FACTORY_PARAMS)
    return params
