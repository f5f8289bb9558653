"""Wiring: a store from a URL, a default model registry, an engine from both.

Adapters are imported here lazily, by URL scheme, so ``import convcore``
never pulls in a driver; a missing one fails naming the extra to install.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from .engine import Engine
from .errors import ConvcoreError, InvalidRequestError, MissingDependencyError
from .local import LocalBackend
from .memory import MemoryStore
from .protocols import ConversationStore
from .records import MemoryRecordStore, RecordStore
from .registry import ModelRegistry, ModelSpec

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_STORE_URL",
    "default_registry",
    "open_engine",
    "open_record_store",
    "open_store",
]

DEFAULT_MODEL = "convcore-local"
DEFAULT_STORE_URL = "sqlite:///convcore.db"

# scheme -> (module, factory attribute, extra)
_STORES = {
    "sqlite": ("convcore_sql", "SQLStore", "sql"),
    "postgresql": ("convcore_sql", "SQLStore", "sql"),
    "postgres": ("convcore_sql", "SQLStore", "sql"),
    "mysql": ("convcore_sql", "SQLStore", "sql"),
    "mariadb": ("convcore_sql", "SQLStore", "sql"),
    "redis": ("convcore_redis", "RedisStore", "redis"),
    "rediss": ("convcore_redis", "RedisStore", "redis"),
    "redis+cluster": ("convcore_redis", "RedisStore", "redis"),
    "rediss+cluster": ("convcore_redis", "RedisStore", "redis"),
}


def _load(module: str, attr: str, extra: str, what: str) -> Any:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(what, extra) from exc
    return getattr(mod, attr)


def _adapter(url: str) -> tuple[str, str, str] | None:
    """(module, extra, scheme) for ``url``; None for ``memory://``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    base = scheme if scheme in _STORES else scheme.split("+", 1)[0]
    if scheme == "memory":
        return None
    if base not in _STORES:
        raise InvalidRequestError(
            f"unsupported store URL scheme {scheme!r}; use memory://, sqlite:///path.db, "
            "postgresql://, mysql://, redis:// or redis+cluster://",
            field="store_url",
        )
    module, _, extra = _STORES[base]
    return module, extra, base


def open_store(url: str, **options: Any) -> ConversationStore:
    """A store for ``url``: ``memory://``, ``sqlite:///path.db``,
    ``postgresql://…``, ``mysql://…``, ``redis://…``, ``redis+cluster://…``.

    The store owns the connections it opens; close it with ``aclose()``.
    """
    found = _adapter(url)
    if found is None:
        return MemoryStore()
    module, extra, base = found
    factory = _load(module, _STORES[base][1], extra, f"the {base} store")
    store: ConversationStore = _opened(factory, url, options)
    return store


def open_record_store(url: str, **options: Any) -> RecordStore:
    """The record store (apps, datasources, knowledge, flows) for the same URLs."""
    found = _adapter(url)
    if found is None:
        return MemoryRecordStore()
    module, extra, base = found
    attr = "SQLRecordStore" if module == "convcore_sql" else "RedisRecordStore"
    factory = _load(f"{module}.records", attr, extra, f"the {base} record store")
    records: RecordStore = _opened(factory, url, options)
    return records


def _opened(factory: Any, url: str, options: dict[str, Any]) -> Any:
    """``factory.from_url``; a URL its driver cannot take is a clear error
    (the message names the problem, never the URL: it may hold a password)."""
    try:
        return factory.from_url(url, **options)
    except (ConvcoreError, ImportError):
        raise
    except Exception as exc:
        raise InvalidRequestError(f"cannot open a store for this URL: {exc}", field="store_url") from exc


def default_registry(*, latency: float = 0.0, tokens_per_second: float = 0.0) -> ModelRegistry:
    """The local deterministic model, as ``convcore-local`` (8k context)."""
    backend = LocalBackend(latency=latency, tokens_per_second=tokens_per_second)
    return ModelRegistry([ModelSpec(name=DEFAULT_MODEL, backend=backend, context_window=8192)])


def open_engine(
    store_url: str | None = None,
    *,
    models: ModelRegistry | None = None,
    **engine_options: Any,
) -> Engine:
    """An engine that owns its store (and registry): ``aclose()`` it when done.

    ``store_url`` defaults to ``$CONVCORE_STORE_URL``, else a SQLite file.
    """
    url = store_url or os.environ.get("CONVCORE_STORE_URL") or DEFAULT_STORE_URL
    return Engine(open_store(url), models or default_registry(), owned=True, **engine_options)
