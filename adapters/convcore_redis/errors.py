"""Driver errors mapped onto convcore's tree, at this adapter's edge.

Cannot reach the server (refused, reset, timed out, cluster down or being
reconfigured, still loading its data) -> ``StorageUnavailableError``; any
other Redis error, or a record that does not decode -> ``StorageError``.
The original is always chained with ``from``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis import exceptions as rx

from convcore.errors import StorageError, StorageUnavailableError

__all__ = ["driver_errors", "mapped"]

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError and MaxConnectionsError
    rx.TimeoutError,
    rx.ClusterDownError,  # includes MasterDownError
    rx.TryAgainError,
    rx.RedisClusterException,  # no reachable node, slot not covered
    OSError,  # a socket error the driver did not wrap
)


def mapped(action: str, exc: BaseException) -> StorageError | None:
    """The convcore error for ``exc`` raised while doing ``action``, or None
    when it is not a driver's (it then propagates as it is)."""
    if isinstance(exc, rx.CrossSlotTransactionError):
        return StorageError(f"Redis refused {action}: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StorageUnavailableError(f"Redis is unreachable while {action}: {exc}")
    if isinstance(exc, rx.RedisError):
        return StorageError(f"Redis failed while {action}: {exc}")
    if isinstance(exc, ValueError):  # json / pydantic: a record this store cannot read
        return StorageError(f"unreadable Redis record while {action}: {exc}")
    return None


@contextmanager
def driver_errors(action: str) -> Iterator[None]:
    """Map what the block raises while doing ``action`` (e.g. "appending a turn")."""
    try:
        yield
    except Exception as exc:
        error = mapped(action, exc)
        if error is None:
            raise
        raise error from exc
