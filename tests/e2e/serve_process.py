"""``convcore serve`` as a child process on a free loopback port, for tests
that need the real server (its timeouts, its crash, two of them at once).

Each process is this test's own: it is stopped by its pid, never by name.
Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["KEY", "ServeProcess", "free_port"]

KEY = "serve-process-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    """One ``convcore serve --store <store_url>`` with ``extra`` flags."""

    store_url: str
    log_dir: Path
    extra: tuple[str, ...] = ()
    port: int = 0
    access_log: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"serve-{self.port}.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> ServeProcess:
        self.port = self.port or free_port()
        env = {**os.environ, "CONVCORE_API_KEYS": KEY}
        env.pop("CONVCORE_MODELS", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "convcore", "serve",
                    "--port", str(self.port),
                    "--store", self.store_url,
                    *(() if self.access_log else ("--no-access-log",)),
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"convcore serve exited with {self.process.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"convcore serve did not become ready: {self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup; what was stored stays, nothing else."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
