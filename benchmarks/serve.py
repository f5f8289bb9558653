"""How the HTTP processes are started: ``convcore serve`` and the floor's minimal app.

Both run under uvicorn in a process of their own on loopback, with the same
uvicorn settings (one worker, warnings only, no access log, no server
header), so the ratio between them is convcore's own cost per request.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["floor_command", "serve_command"]


def serve_command(
    store_url: str,
    port: int,
    *,
    api_key: str,
    latency: float = 0.0,
    tokens_per_second: float = 0.0,
    extra: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for ``convcore serve`` on ``store_url``, on loopback.

    The API key goes through the environment (``CONVCORE_API_KEYS``), as the
    server's own help recommends, not the command line."""
    argv = [
        sys.executable, "-m", "convcore", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--store", store_url,
        "--local-latency", str(latency), "--local-tokens-per-second", str(tokens_per_second),
        "--log-level", "warning", "--no-access-log",
        *(extra or []),
    ]  # fmt: skip
    return argv, {"CONVCORE_API_KEYS": api_key}


def floor_command(port: int) -> list[str]:
    """argv for the minimal ASGI app that answers a fixed completion, served the same way."""
    return [
        sys.executable, "-m", "uvicorn", f"{__package__}.floors:fixed_completion_app",
        "--app-dir", str(Path(__file__).resolve().parents[1]),
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log", "--no-server-header",
    ]  # fmt: skip
