"""A real ``convcore serve`` process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

KEYS = ("e2e-key-one", "e2e-key-two")


def sql_store_available() -> bool:
    try:
        import convcore_sql
    except ImportError:
        return False
    return hasattr(convcore_sql, "SQLStore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]

    @property
    def api(self) -> str:
        return f"{self.base}/api/v2"


@contextmanager
def serve(
    tmp: Path, *extra: str, store: str | None = None, environ: Mapping[str, str] | None = None
) -> Iterator[Server]:
    """A ``convcore serve`` process, ready (polled on /api/v2/models), stopped at
    exit; on a SQLite file in ``tmp`` unless ``store`` names a store URL;
    ``environ`` adds to its environment."""
    port = free_port()
    env = {**os.environ, "CONVCORE_API_KEYS": KEYS[1]}
    env.pop("CONVCORE_MODELS", None)
    env.update(environ or {})
    log = (tmp / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convcore",
            "serve",
            "--port",
            str(port),
            "--api-key",
            KEYS[0],
            "--store",
            store or f"sqlite:///{tmp / 'convcore.db'}",
            "--no-access-log",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"convcore serve exited with {process.returncode}: {server_log(tmp)}")
            try:
                r = httpx.get(
                    f"{base}/api/v2/models", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=1
                )
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"convcore serve did not become ready: {server_log(tmp)}")
            time.sleep(0.05)
        yield Server(base, process)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def server_log(tmp: Path) -> str:
    return (tmp / "serve.log").read_text(errors="replace")[-2000:]
