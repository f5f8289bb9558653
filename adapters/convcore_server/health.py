"""``/healthz`` (the process answers) and ``/readyz`` (it can serve turns).

Readiness asks the store for a conversation that does not exist (a store
with a ``ping()`` checks more: a SQLite file must still be the one it opened,
and writable) and each
distinct model backend that can be asked (one with a ``ping()``: the
OpenAI-compatible backend GETs ``/models``; the in-process local model
always can), all at once, each within ``timeout`` seconds. Any failure is a
503 whose body names the check and why, so a load balancer stops sending
turns while the store is down and resumes when it is back. Neither route
needs a key: they say nothing about any conversation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from convcore import Engine

__all__ = ["build_health_router", "readiness"]

_PROBE_CONV = "convcore-readyz-probe"


class Liveness(BaseModel):
    status: str = Field(description="ok")


class ReadinessCheck(BaseModel):
    ok: bool
    seconds: float
    error: str | None = Field(default=None, description="Why the check failed")


class Readiness(BaseModel):
    status: str = Field(description="ok, or unavailable")
    checks: dict[str, ReadinessCheck] = Field(
        description="store, and backend:<models> for each backend asked"
    )


def build_health_router(engine: Engine, timeout: float) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/healthz",
        summary="Liveness: the process answers",
        operation_id="healthz",
        response_model=None,
        responses={200: {"model": Liveness}},
    )
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @router.get(
        "/readyz",
        summary="Readiness: the store and every model backend answer",
        operation_id="readyz",
        response_model=None,
        responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "A check failed"}},
    )
    async def readyz() -> JSONResponse:
        checks = await readiness(engine, timeout)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
        )

    return router


async def readiness(engine: Engine, timeout: float) -> dict[str, dict[str, Any]]:
    """Each check's ``{ok, seconds[, error]}``, run concurrently."""
    probes: dict[str, Awaitable[object]] = {"store": _store_ready(engine.store)}
    names: dict[int, list[str]] = {}
    for spec in engine.models:
        names.setdefault(id(spec.backend), []).append(spec.name)
    for backend in engine.models.backends():
        ping = getattr(backend, "ping", None)
        if ping is not None:
            probes[f"backend:{','.join(sorted(names.get(id(backend), ['?'])))}"] = ping()
    results = await asyncio.gather(*(_timed(p, timeout) for p in probes.values()))
    return dict(zip(probes, results, strict=True))


async def _store_ready(store: Any) -> None:
    """A read answers; then what the store's own ``ping()``, if it has one,
    checks beyond a read (a SQLite file must still be there and writable)."""
    await store.get_conversation(_PROBE_CONV)
    ping = getattr(store, "ping", None)
    if ping is not None:
        await ping()


async def _timed(probe: Awaitable[object], timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    error: str | None = None
    try:
        await asyncio.wait_for(probe, timeout)
    except TimeoutError:
        error = f"no answer in {timeout} s"
    except Exception as exc:
        error = str(exc)[:300] or type(exc).__name__
    result: dict[str, Any] = {"ok": error is None, "seconds": round(time.perf_counter() - started, 4)}
    if error is not None:
        result["error"] = error
    return result
