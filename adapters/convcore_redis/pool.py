"""Connection options that survive a Redis restart.

A pooled connection to a server that restarted is dead, and redis-py only
finds out when it uses it: without these options the first command on each
such connection fails ("Connection closed by server") although the server
is back. A connection idle for ``HEALTH_CHECK_SECONDS`` is PINGed before use
and replaced if the PING fails, and a command that fails because its
connection broke is sent once more on a fresh one.

Sending a turn's command twice is safe: reads are reads, deletes and index
updates are idempotent, and an append carries its turn_id, so a second
append of a turn the first one stored answers ``duplicate`` instead of
writing it again. The chat modes' records share the client; a record write
sent again after the first was applied answers as if it had not been (a
create finds the record there, a delete finds nothing). That needs the
connection to break after the server applied the write and before it
answered, and leaves the records as the caller asked.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

__all__ = ["HEALTH_CHECK_SECONDS", "resilient_options"]

HEALTH_CHECK_SECONDS = 5


def resilient_options(cluster: bool, **given: Any) -> dict[str, Any]:
    """Client options with health checks and one retry on a broken connection;
    ``given`` (the caller's own options) wins. A cluster client keeps its own
    retry policy, which also follows slots that moved."""
    options: dict[str, Any] = {"health_check_interval": HEALTH_CHECK_SECONDS, "socket_keepalive": True}
    if not cluster:
        options["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), 1)
        options["retry_on_error"] = [ConnectionError, TimeoutError]
    return {**options, **given}
