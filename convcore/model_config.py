"""The model registry from a config file or the environment.

:func:`load_registry` reads a TOML or JSON file named by its ``path``
argument or by ``$CONVCORE_MODELS``; that variable may also hold the JSON
itself (anything starting with ``[`` or ``{``), handy in containers. With
neither, it returns :func:`convcore.bootstrap.default_registry`.

A file lists models; the first is the default::

    [[models]]
    name = "gpt-4o-mini"            # what clients ask for
    backend = "openai"              # any server speaking POST {base_url}/chat/completions
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"  # the variable holding the key (or api_key = "...")
    context_window = 128000
    max_new_tokens = 1024           # default reply budget (512, or half a smaller window)
    # upstream = "gpt-4o-mini"      # the name the server is asked for (default: name)
    # encoding = "o200k_base"       # token counting (default: from the upstream name)
    # timeout = 60.0                # seconds to wait for data (connect_timeout: 5.0)
    # max_retries = 3               # retries before the first token
    # instruction_role = "system"   # role for system/developer messages ("developer" for o1/o3/o4/gpt-5)
    # supported_params = ["stop", "seed"]   # OpenAI parameters the server takes (default: all)
    [models.defaults]               # OpenAI parameters used when a request is silent
    temperature = 0.2
    top_p = 0.9

    [[models]]
    name = "convcore-echo"
    backend = "local"               # the deterministic echo model (not a language model)
    context_window = 8192
    latency = 0.0                   # seconds before the first token
    tokens_per_second = 0.0         # 0: as fast as possible

The JSON form is ``{"models": [...]}`` or just the list. Any entry also
takes ``owned_by``. Every field is checked (unknown ones too) and a bad file
raises :class:`~convcore.errors.InvalidRequestError` naming the entry and
the field; key values never appear in errors or reprs. Models whose
backends have identical settings share one backend instance (one
connection pool). The OpenAI-compatible backend needs the ``openai`` extra;
it is imported only when a file asks for it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, field_validator

from . import plugins
from .bootstrap import default_registry
from .errors import InvalidRequestError, TokenizerError
from .local import LocalBackend
from .params import PASS_THROUGH, validate_defaults
from .protocols import ModelBackend
from .registry import ModelRegistry, ModelSpec
from .tokens import encoding_for_model, get_tokenizer

__all__ = ["ENV_VAR", "LocalModelEntry", "OpenAIModelEntry", "load_registry", "parse_models"]

ENV_VAR = "CONVCORE_MODELS"

_ENTRY_CONFIG = ConfigDict(frozen=True, extra="forbid", strict=True)


class _Entry(BaseModel):
    model_config = _ENTRY_CONFIG

    name: str = Field(min_length=1)
    context_window: int = Field(ge=2)
    max_new_tokens: int | None = Field(default=None, ge=1)
    encoding: str = ""
    upstream: str = ""
    owned_by: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    instruction_role: Literal["system", "developer"] | None = None

    @property
    def reply_budget(self) -> int:
        """``max_new_tokens``, by default 512 or half the window if that is smaller."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return min(512, self.context_window // 2)


class LocalModelEntry(_Entry):
    """A model answered by :class:`~convcore.local.LocalBackend`."""

    backend: Literal["local"]
    latency: float = Field(default=0.0, ge=0)
    tokens_per_second: float = Field(default=0.0, ge=0)


class OpenAIModelEntry(_Entry):
    """A model on a server speaking OpenAI's chat/completions."""

    backend: Literal["openai"]
    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(default=None, min_length=1)
    timeout: float | None = Field(default=60.0, gt=0)
    connect_timeout: float | None = Field(default=5.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    supported_params: list[str] | None = None

    @field_validator("supported_params")
    @classmethod
    def _known_params(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted({v.partition(":")[0] for v in value or ()} - set(PASS_THROUGH))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; known: {', '.join(PASS_THROUGH)}")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


_ENTRY: TypeAdapter[LocalModelEntry | OpenAIModelEntry] = TypeAdapter(
    Annotated[LocalModelEntry | OpenAIModelEntry, Field(discriminator="backend")]
)


def load_registry(path: str | None = None) -> ModelRegistry:
    """The registry described by ``path``, else by ``$CONVCORE_MODELS`` (a
    path or inline JSON), else the default one with the local model."""
    source = path or os.environ.get(ENV_VAR, "").strip()
    if not source:
        return default_registry()
    if path is None and source[0] in "[{":
        return parse_models(_parse_json(source, f"${ENV_VAR}"))
    return parse_models(_read_file(Path(source).expanduser()))


def parse_models(data: object) -> ModelRegistry:
    """A registry from already-parsed config data (a dict with ``models``, or a list)."""
    entries = _validate(data)
    # Every entry is checked (keys resolved, encodings loaded) before any
    # backend opens a pool.
    for index, entry in enumerate(entries):
        try:
            validate_defaults(entry.defaults, f"models[{index}].defaults")
        except InvalidRequestError as exc:
            raise _relabel(exc, entry.name, index, exc.field) from None
        if entry.encoding:
            try:
                get_tokenizer(entry.encoding)
            except TokenizerError as exc:
                raise InvalidRequestError(
                    f"{_label({'name': entry.name}, index)}: {exc}", field=f"models[{index}].encoding"
                ) from exc
    plans = [_backend_factory(entry, index) for index, entry in enumerate(entries)]
    backends: dict[tuple[object, ...], ModelBackend] = {}
    specs = []
    for index, (entry, (key, factory)) in enumerate(zip(entries, plans, strict=True)):
        if key not in backends:
            backends[key] = factory()
        try:
            spec = ModelSpec(
                name=entry.name,
                backend=backends[key],
                context_window=entry.context_window,
                max_new_tokens=entry.reply_budget,
                encoding=entry.encoding,
                upstream=entry.upstream,
                owned_by=entry.owned_by or ModelSpec.owned_by,
                defaults=entry.defaults,
                instruction_role=entry.instruction_role or "",
            )
        except InvalidRequestError as exc:
            raise _relabel(exc, entry.name, index, f"models[{index}].defaults.{exc.field}") from None
        specs.append(spec)
    return ModelRegistry(specs)


def _relabel(exc: InvalidRequestError, name: str, index: int, field: str | None) -> InvalidRequestError:
    message = str(exc).removeprefix(f"{exc.field}: ") if exc.field else str(exc)
    return InvalidRequestError(f"{_label({'name': name}, index)}: {message}", field=field)


def _read_file(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"cannot read the models file {str(path)!r}: {exc}", field="models"
        ) from exc
    if path.suffix.lower() == ".json" or (path.suffix.lower() != ".toml" and text.lstrip()[:1] == "{"):
        return _parse_json(text, str(path))
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError(f"{str(path)!r} is not valid TOML: {exc}", field="models") from exc


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"{source} is not valid JSON: {exc}", field="models") from exc


def _validate(data: object) -> list[LocalModelEntry | OpenAIModelEntry]:
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"models"})
        if unknown:
            raise InvalidRequestError(
                f"unknown top-level key(s) {unknown}; expected 'models'", field="models"
            )
        data = data.get("models")
    if not isinstance(data, list) or not data:
        raise InvalidRequestError("must be a non-empty list of model entries", field="models")
    entries: list[LocalModelEntry | OpenAIModelEntry] = []
    seen: set[str] = set()
    for index, raw in enumerate(data):
        label = _label(raw, index)
        if not isinstance(raw, dict):
            raise InvalidRequestError(f"{label} must be a table/object", field=f"models[{index}]")
        entry = _validate_entry(raw, label, index)
        if isinstance(entry, InvalidRequestError):
            # Raised outside the handler so pydantic's error, which quotes the
            # input (maybe a key), is neither the cause nor the context.
            raise entry
        if entry.name in seen:
            raise InvalidRequestError(f"{label} repeats a model name", field=f"models[{index}].name")
        if entry.reply_budget >= entry.context_window:
            raise InvalidRequestError(
                f"{label}: must be below context_window", field=f"models[{index}].max_new_tokens"
            )
        if isinstance(entry, OpenAIModelEntry) and entry.api_key and entry.api_key_env:
            raise InvalidRequestError(
                f"{label}: give api_key or api_key_env, not both", field=f"models[{index}].api_key"
            )
        seen.add(entry.name)
        entries.append(entry)
    return entries


def _validate_entry(
    raw: dict[str, Any], label: str, index: int
) -> LocalModelEntry | OpenAIModelEntry | InvalidRequestError:
    try:
        return _ENTRY.validate_python(raw)
    except ValidationError as exc:
        return _entry_error(exc, label, index)


def _label(raw: object, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"model {name!r} (entry {index + 1})" if isinstance(name, str) else f"entry {index + 1}"


def _entry_error(exc: ValidationError, label: str, index: int) -> InvalidRequestError:
    """The first problem, by location and message only: pydantic's own text
    would quote the input value, and that may be an API key."""
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] in ("local", "openai"):
        loc = loc[1:]  # the discriminator's branch, not a field
    field = ".".join(loc) or "backend"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        message = "backend must be 'local' or 'openai'"
    return InvalidRequestError(f"{label}: {message}", field=f"models[{index}].{field}")


def _backend_factory(entry: LocalModelEntry | OpenAIModelEntry, index: int) -> tuple[tuple[object, ...], Any]:
    """A key equal for identical backend settings, and how to build that backend."""
    if isinstance(entry, LocalModelEntry):
        # The local model generates in its own encoding, so usage counts match.
        encoding = entry.encoding or encoding_for_model(entry.upstream or entry.name)
        local = (entry.latency, entry.tokens_per_second, encoding)
        return ("local", *local), lambda: LocalBackend(
            latency=local[0], tokens_per_second=local[1], tokenizer=get_tokenizer(encoding)
        )
    api_key = entry.api_key.get_secret_value() if entry.api_key is not None else None
    if entry.api_key_env is not None:
        api_key = os.environ.get(entry.api_key_env) or None
        if api_key is None:
            raise InvalidRequestError(
                f"{_label({'name': entry.name}, index)}: environment variable "
                f"{entry.api_key_env!r} is not set",
                field=f"models[{index}].api_key_env",
            )
    backend_class = _openai_backend_class()
    options: dict[str, object] = {
        "api_key": api_key,
        "timeout": entry.timeout,
        "connect_timeout": entry.connect_timeout,
        "max_retries": entry.max_retries,
    }
    if entry.supported_params is not None:
        options["supported_params"] = tuple(entry.supported_params)  # hashable: part of the key
    base_url = entry.base_url.rstrip("/")
    key = ("openai", base_url, *options.values())
    return key, lambda: backend_class(base_url, **options)


def _openai_backend_class() -> Any:
    """The class registered as backend ``openai`` (``convcore.backends`` entry points)."""
    found = plugins.load(plugins.BACKENDS, "openai", "the OpenAI-compatible backend")
    if found is None:
        raise InvalidRequestError("no installed package provides the 'openai' backend", field="backend")
    return found
