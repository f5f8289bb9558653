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

__all__ = ["driver_errors"]

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError and MaxConnectionsError
    rx.TimeoutError,
    rx.ClusterDownError,  # includes MasterDownError
    rx.TryAgainError,
    rx.RedisClusterException,  # no reachable node, slot not covered
    OSError,  # a socket error the driver did not wrap
)


@contextmanager
def driver_errors(action: str) -> Iterator[None]:
    """Map what the block raises while doing ``action`` (e.g. "appending a turn")."""
    try:
        yield
    except rx.CrossSlotTransactionError as exc:
        raise StorageError(f"Redis refused {action}: {exc}") from exc
    except _UNAVAILABLE as exc:
        raise StorageUnavailableError(f"Redis is unreachable while {action}: {exc}") from exc
    except rx.RedisError as exc:
        raise StorageError(f"Redis failed while {action}: {exc}") from exc
    except ValueError as exc:  # json / pydantic: a record this store cannot read
        raise StorageError(f"unreadable Redis record while {action}: {exc}") from exc
