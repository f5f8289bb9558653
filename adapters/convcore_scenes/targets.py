"""Where a datasource connects, and whether that is the service's own store.

The store holds every conversation and every datasource's (sealed)
password, so chat_data must never query it. A server datasource is the
store when it reaches the same server (by address: names are resolved, and
``localhost``, ``127.0.0.1``, ``::1``, ``0.0.0.0`` and this machine's own
addresses all count as one) on the same port and database. The check runs
when a datasource is saved and again before each query; the connection then
goes to the address that was checked, so a name that resolves elsewhere a
moment later (DNS rebinding) cannot slip past.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

import anyio

from convcore.errors import InvalidRequestError

__all__ = [
    "DEFAULT_PORTS",
    "HOST_MAX_LENGTH",
    "HOST_PATTERN",
    "ServerTarget",
    "UnresolvedHostError",
    "check_host_syntax",
    "resolve_host",
    "server_target",
    "store_server",
    "store_sqlite_file",
]

DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
_LOCAL = "this machine"
# A host name or an IP literal: no socket paths, no lists, no options.
# A host name (dot-separated labels of 1 to 63 characters, the first starting with a
# letter or digit), an IPv4 address, or an IPv6 address (bare or in brackets).
HOST_PATTERN = (
    r"^(?:\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f]*:[0-9A-Fa-f:.]*"
    r"|[A-Za-z0-9][A-Za-z0-9_-]{0,62}(?:\.[A-Za-z0-9_-]{1,63})*\.?)$"
)
HOST_MAX_LENGTH = 253
_HOST = re.compile(HOST_PATTERN[1:-1])


class UnresolvedHostError(InvalidRequestError):
    """``db_host`` resolves to no address (now)."""

    def __init__(self, host: str) -> None:
        super().__init__(f"cannot be resolved: {host!r}", field="db_host")


@dataclass(frozen=True)
class ServerTarget:
    """A database server's resolved addresses, its port and a database on it."""

    addresses: frozenset[str]
    port: int
    database: str

    def same_database(self, other: ServerTarget) -> bool:
        return (
            self.port == other.port
            and self.database == other.database
            and bool(self.addresses & other.addresses)
        )


def check_host_syntax(host: str) -> None:
    """InvalidRequestError unless ``host`` is one host name or IP address."""
    if len(host) > HOST_MAX_LENGTH or not _HOST.fullmatch(host):
        raise InvalidRequestError("must be a host name or an IP address", field="db_host")


@functools.cache
def _own_addresses() -> frozenset[str]:
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM):
            found.add(str(info[4][0]).split("%")[0])
    except OSError:
        pass
    return frozenset(found)


def _canonical(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified or str(ip) in _own_addresses():
        return _LOCAL
    return str(ip)


def _resolve_sync(host: str) -> list[tuple[str, str]]:
    literal = host.strip("[]")
    try:
        return [(_canonical(literal), literal)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(literal, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # UnicodeError: a label IDNA refuses (empty, over 63 characters)
        raise UnresolvedHostError(host) from None
    seen: dict[str, str] = {}
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        seen.setdefault(address, _canonical(address))
    return [(canon, address) for address, canon in seen.items()]


async def resolve_host(host: str) -> list[tuple[str, str]]:
    """``(canonical, address)`` for each address ``host`` resolves to; the
    canonical form folds every address of this machine into one."""
    check_host_syntax(host)
    return await anyio.to_thread.run_sync(_resolve_sync, host)


async def server_target(host: str, port: int, database: str) -> tuple[ServerTarget, str]:
    """The target and the one address to connect to (the first resolved)."""
    resolved = await resolve_host(host)
    target = ServerTarget(frozenset(canon for canon, _ in resolved), port, database)
    return target, resolved[0][1]


async def store_server(store_url: str | None) -> ServerTarget | None:
    """The server database a PostgreSQL/MySQL/MariaDB store URL names; None for other stores."""
    if not store_url:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(store_url)
    except ArgumentError:
        return None
    backend = url.get_backend_name()
    kind = "postgresql" if backend in {"postgresql", "postgres"} else backend
    if kind not in DEFAULT_PORTS:
        return None
    host = url.host or "localhost"
    try:
        target, _ = await server_target(host, url.port or DEFAULT_PORTS[kind], url.database or "")
    except InvalidRequestError:
        return None
    return target


def store_sqlite_file(store_url: str | None) -> str | None:
    """The file of a ``sqlite:///…`` store URL; None for other stores or in-memory SQLite."""
    if not store_url:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(store_url)
    except ArgumentError:
        return None
    database = url.database or ""
    if not url.get_backend_name().startswith("sqlite") or database in {"", ":memory:"}:
        return None
    return database.removeprefix("file:").split("?")[0]
