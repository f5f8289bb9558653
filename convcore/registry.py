"""Model names mapped to a backend, a context window and an encoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidRequestError, UnknownModelError
from .params import check_supported, validate_defaults
from .protocols import ModelBackend
from .tokens import encoding_for_model

__all__ = ["ModelRegistry", "ModelSpec", "supported_params"]


@dataclass(frozen=True)
class ModelSpec:
    """How to reach one model and how big its context is.

    ``upstream`` is the name the backend is asked for (defaults to ``name``);
    ``encoding`` defaults to what OpenAI uses for that name, else cl100k_base.
    ``defaults`` are OpenAI parameters (and ``temperature``) that apply when
    a request is silent about them; each must be one the backend supports.
    ``instruction_role`` is the role system and developer messages are sent
    under: ``developer`` for OpenAI's reasoning models (o1, o3, o4, gpt-5),
    which take it in place of ``system``, else ``system``, which every
    OpenAI-compatible server knows.
    """

    name: str
    backend: ModelBackend
    context_window: int
    max_new_tokens: int = 512
    encoding: str = ""
    upstream: str = ""
    owned_by: str = "convcore"
    extra: dict[str, object] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    instruction_role: Literal["system", "developer", ""] = ""

    def __post_init__(self) -> None:
        if self.context_window < 2:
            raise InvalidRequestError("must be at least 2", field="context_window")
        if not 1 <= self.max_new_tokens < self.context_window:
            raise InvalidRequestError("must be at least 1 and below context_window", field="max_new_tokens")
        if not self.encoding:
            object.__setattr__(self, "encoding", encoding_for_model(self.upstream or self.name))
        if not self.upstream:
            object.__setattr__(self, "upstream", self.name)
        if not self.instruction_role:
            reasoning = self.upstream.startswith(_DEVELOPER_ROLE_MODELS)
            object.__setattr__(self, "instruction_role", "developer" if reasoning else "system")
        if self.defaults:
            defaults = validate_defaults(self.defaults, "defaults")
            sampling = {k: v for k, v in defaults.items() if k != "temperature"}
            check_supported(sampling, supported_params(self.backend), f"the backend of model {self.name!r}")
            object.__setattr__(self, "defaults", defaults)


_DEVELOPER_ROLE_MODELS = ("o1", "o3", "o4", "gpt-5")


def supported_params(backend: ModelBackend) -> frozenset[str]:
    """What ``backend`` declares it honours; nothing if it declares nothing."""
    return frozenset(getattr(backend, "supported_params", ()))


class ModelRegistry:
    """The models an engine can serve; the first registered is the default.

    ``aliases`` map old names to registered ones, so a renamed model keeps
    answering requests (and continuing conversations) that use the old
    name; listings show only the registered names.
    """

    def __init__(
        self, specs: list[ModelSpec] | None = None, *, aliases: dict[str, str] | None = None
    ) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._aliases: dict[str, str] = {}
        for spec in specs or []:
            self.register(spec)
        for old, new in (aliases or {}).items():
            self.alias(old, new)

    def register(self, spec: ModelSpec) -> None:
        self._specs[spec.name] = spec

    def alias(self, old: str, name: str) -> None:
        """Answer requests for ``old`` with the registered model ``name``."""
        self.get(name)
        self._aliases[old] = name

    def get(self, name: str | None) -> ModelSpec:
        """The spec for ``name`` (the default for None); UnknownModelError otherwise."""
        if name is None:
            if not self._specs:
                raise UnknownModelError("(default)", [])
            return next(iter(self._specs.values()))
        try:
            return self._specs[self._aliases.get(name, name)]
        except KeyError:
            raise UnknownModelError(name, list(self._specs)) from None

    def names_of(self, spec: ModelSpec) -> list[str]:
        """``spec``'s name and the old names that still reach it."""
        return [spec.name, *sorted(old for old, new in self._aliases.items() if new == spec.name)]

    def __contains__(self, name: object) -> bool:
        return name in self._specs or name in self._aliases

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._specs.values()))

    def backends(self) -> list[ModelBackend]:
        """Each distinct backend once, for closing."""
        seen: dict[int, ModelBackend] = {}
        for spec in self._specs.values():
            seen.setdefault(id(spec.backend), spec.backend)
        return list(seen.values())
