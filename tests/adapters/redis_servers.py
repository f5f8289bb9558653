"""Redis servers the tests start themselves on loopback: a single server for
fault tests and a 3-master cluster, shared by the whole test session.

Each server is a child ``redis-server`` process of this one (not daemonized),
so it is stopped by its pid. Waits poll the server; every wait is bounded.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

__all__ = [
    "RedisCluster3",
    "RedisServer",
    "ServerUnavailable",
    "free_port",
    "own_redis_server",
    "shared_cluster",
]

CLUSTER_BUS_OFFSET = 10_000


class ServerUnavailable(RuntimeError):
    """redis-server (or redis-cli) is missing or would not start."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and, for cluster nodes, port + 10000 free too)."""
    for _ in range(200):
        port = random.randint(20_000, 30_000)
        if _port_free(port) and (not with_bus or _port_free(port + CLUSTER_BUS_OFFSET)):
            return port
    raise ServerUnavailable("no free loopback port found")


def _wait(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise ServerUnavailable(f"timed out waiting for {what}: {last}")


@dataclass
class RedisServer:
    """One redis-server child process on 127.0.0.1:``port``, data in ``dir``."""

    port: int
    dir: Path
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServerUnavailable("redis-server is not installed (apt-get install redis-server)")
        log = open(self.dir / f"redis-{self.port}.log", "ab")  # the child writes it; closed below
        self.process = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            _wait(client.ping, f"redis-server on port {self.port}", timeout)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: nothing gets a chance to flush beyond what was fsynced."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@dataclass
class RedisCluster3:
    """Three masters, no replicas, on free loopback ports."""

    dir: Path
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServerUnavailable("redis-cli is not installed (apt-get install redis-tools)")
        for _ in range(3):
            port = free_port(with_bus=True)
            node = RedisServer(
                port,
                self.dir,
                [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--appendonly", "no",
                ],
            )  # fmt: skip
            self.nodes.append(node)
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ServerUnavailable(f"redis-cli --cluster create failed: {done.stdout!r} {done.stderr!r}")
        for node in self.nodes:
            client = redis.Redis(port=node.port, socket_timeout=2, decode_responses=True)
            try:
                _wait(
                    lambda c=client: c.cluster("info")["cluster_state"] == "ok", "cluster_state:ok", timeout
                )
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()


_cluster: RedisCluster3 | None = None
_cluster_error: ServerUnavailable | None = None
_cluster_owner: int | None = None


def shared_cluster() -> RedisCluster3:
    """The session's cluster, started on first use and stopped at exit.

    Raises :class:`ServerUnavailable` (every time) if it could not start.
    """
    global _cluster, _cluster_error, _cluster_owner
    if _cluster is not None:
        return _cluster
    if _cluster_error is not None:
        raise _cluster_error
    tmp = Path(tempfile.mkdtemp(prefix="cctest-cluster-"))
    cluster = RedisCluster3(tmp)
    _cluster_owner = os.getpid()

    def teardown() -> None:
        if os.getpid() == _cluster_owner:
            cluster.stop()
            shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(teardown)
    try:
        cluster.start()
    except (ServerUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        _cluster_error = exc if isinstance(exc, ServerUnavailable) else ServerUnavailable(str(exc))
        raise _cluster_error from exc
    _cluster = cluster
    return cluster


def own_redis_server(directory: Path, extra: list[str]) -> RedisServer:
    """A started redis-server of the test's own (a skip on a developer
    machine without one, a failure in CI)."""
    from tests.stores import unavailable

    server = RedisServer(free_port(), directory, extra)
    try:
        server.start()
    except ServerUnavailable as exc:
        unavailable(f"cannot start a redis-server of its own: {exc}")
    return server
