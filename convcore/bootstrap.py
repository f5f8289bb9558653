"""Wiring: a storage from a URL, a default model registry, an engine from both.

Store adapters register the URL schemes they serve in the ``convcore.stores``
entry-point group (see :mod:`convcore.plugins`) and are imported only when a
URL asks for them, so ``import convcore`` never pulls in a driver; a missing
one fails naming the extra to install.
"""

from __future__ import annotations

import os
from typing import Any

from . import plugins
from .engine import Engine
from .errors import ConvcoreError, InvalidRequestError
from .local import LocalBackend
from .memory import MemoryStore
from .protocols import Storage
from .registry import ModelRegistry, ModelSpec

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_STORE_URL",
    "LEGACY_MODEL_ALIAS",
    "default_registry",
    "open_engine",
    "open_store",
]

DEFAULT_MODEL = "convcore-echo"
# The echo model's first name: requests and conversations that use it keep working.
LEGACY_MODEL_ALIAS = "convcore-local"
DEFAULT_STORE_URL = "sqlite:///convcore.db"


def _store_class(url: str) -> Any | None:
    """The class that opens ``url`` (its ``from_url``); None for ``memory://``.

    A scheme with a driver suffix (``postgresql+asyncpg``) falls back to its
    base (``postgresql``) when only that is registered.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        return None
    schemes = plugins.names(plugins.STORES)
    name = scheme if scheme in schemes else scheme.split("+", 1)[0]
    if not scheme or name not in schemes:
        offered = ", ".join(f"{s}://" for s in ["memory", *schemes])
        raise InvalidRequestError(
            f"unsupported store URL scheme {scheme!r}; use one of {offered}", field="store_url"
        )
    return plugins.load(plugins.STORES, name, f"the {name} store")


def open_store(url: str, **options: Any) -> Storage:
    """The storage for ``url``: ``memory://``, ``sqlite:///path.db``,
    ``postgresql://…``, ``mysql://…``, ``redis://…``, ``redis+cluster://…``
    or any scheme an installed adapter registers.

    One object, one connection pool: it is the conversation store, and its
    ``records`` serve the chat modes' registries on the same connections,
    under the same ``prefix`` / ``table_prefix``. It owns what it opens;
    close it with ``aclose()``. ``options`` go to the adapter's ``from_url``.
    """
    factory = _store_class(url)
    if factory is None:
        return MemoryStore()
    try:
        store: Storage = factory.from_url(url, **options)
    except (ConvcoreError, ImportError):
        raise
    except Exception as exc:
        # The message names the problem, never the URL: it may hold a password.
        raise InvalidRequestError(f"cannot open a store for this URL: {exc}", field="store_url") from exc
    return store


def default_registry(*, latency: float = 0.0, tokens_per_second: float = 0.0) -> ModelRegistry:
    """The local echo model, as ``convcore-echo`` (8k context; ``convcore-local``
    is its old name and still answers). It is no language model: it repeats
    the input and reports what history it was shown (see :mod:`convcore.local`)."""
    backend = LocalBackend(latency=latency, tokens_per_second=tokens_per_second)
    return ModelRegistry(
        [ModelSpec(name=DEFAULT_MODEL, backend=backend, context_window=8192)],
        aliases={LEGACY_MODEL_ALIAS: DEFAULT_MODEL},
    )


def open_engine(
    store_url: str | None = None,
    *,
    models: ModelRegistry | str | None = None,
    **engine_options: Any,
) -> Engine:
    """An engine that owns its store (and registry): ``aclose()`` it when done.

    ``store_url`` defaults to ``$CONVCORE_STORE_URL``, else a SQLite file.
    ``models`` is a registry, or a models file (TOML or JSON); by default
    ``$CONVCORE_MODELS`` (a path or inline JSON), else the echo model.
    """
    from .model_config import load_registry  # it builds on this module

    url = store_url or os.environ.get("CONVCORE_STORE_URL") or DEFAULT_STORE_URL
    registry = models if isinstance(models, ModelRegistry) else load_registry(models)
    return Engine(open_store(url), registry, owned=True, **engine_options)
