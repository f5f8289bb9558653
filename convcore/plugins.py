"""Adapters found by entry point, so the core names none of them.

Installed distributions declare what they provide in three entry-point
groups:

- ``convcore.stores``: a store URL scheme -> a class whose ``from_url(url,
  **options)`` returns a :class:`~convcore.protocols.Storage`;
- ``convcore.backends``: a ``backend`` name in a models file -> a
  :class:`~convcore.protocols.ModelBackend` class;
- ``convcore.commands``: a ``convcore`` subcommand -> ``main(argv) -> int``.

An entry point names the extra that brings its drivers (``module:attr
[extra]``), so an adapter whose driver is missing fails with
:class:`~convcore.errors.MissingDependencyError` naming the install command.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import MissingDependencyError

__all__ = ["BACKENDS", "COMMANDS", "STORES", "load", "names"]

STORES = "convcore.stores"
BACKENDS = "convcore.backends"
COMMANDS = "convcore.commands"


def _found(group: str) -> dict[str, EntryPoint]:
    # Read on every call (a few milliseconds): installing an adapter takes
    # effect without restarting an interpreter that already looked.
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    """What ``group`` offers, sorted."""
    return sorted(_found(group))


def load(group: str, name: str, what: str) -> Any | None:
    """The object registered as ``name`` in ``group``; None if nothing is.

    ``what`` names the thing in the error raised when its import fails
    ("the redis store"), together with the extra to install.
    """
    ep = _found(group).get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except ImportError as exc:
        raise MissingDependencyError(what, ep.extras[0] if ep.extras else ep.name) from exc
