"""The fault suite's load and its books: turns sent through HTTP to real
``convcore serve`` processes while something breaks, then every
acknowledged turn looked up in the store.

A client retries a turn with the same request id (so a retry can never
store it twice) until it is acknowledged (200) or the case's deadline
passes. Each case adds one :class:`FaultRow`; ``conftest.py`` prints them
all as a table at the end of the run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from convcore import ConversationStore
from convcore.audit import audit_messages
from tests.e2e.serve_process import KEY

__all__ = ["ROWS", "FaultRow", "Load", "audit_case", "wait_ready"]


@dataclass
class FaultRow:
    case: str
    acknowledged: int
    stored: int
    lost: int
    half_written: int
    duplicated: int
    five_xx_after_recovery: int
    note: str = ""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.half_written or self.duplicated or self.five_xx_after_recovery)


ROWS: list[FaultRow] = []


@dataclass
class Load:
    """``turns`` one-round turns spread over ``conv_uids`` and ``bases``, ``concurrency`` at a time."""

    case: str
    bases: Sequence[str]
    conv_uids: Sequence[str]
    turns: int
    concurrency: int
    serialize: bool | None = None
    deadline: float = 60.0
    acknowledged: dict[str, str] = field(default_factory=dict)  # request_id -> conv_uid
    attempts: list[tuple[float, int]] = field(default_factory=list)  # (started, status; 0 = no answer)
    recovered_at: float | None = None
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    progress_at: int = 0

    def request(self, i: int) -> tuple[str, str, dict[str, object]]:
        rid = f"{self.case}-{i:04d}"
        conv = self.conv_uids[i % len(self.conv_uids)]
        body: dict[str, object] = {"messages": f"q {rid}", "conv_uid": conv, "request_id": rid}
        if self.serialize is not None:
            body["serialize"] = self.serialize
        return rid, self.bases[i % len(self.bases)], body

    async def run(self) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        stop_at = time.monotonic() + self.deadline
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(
            headers={"Authorization": f"Bearer {KEY}"}, timeout=10, limits=limits
        ) as client:

            async def one(i: int) -> None:
                rid, base, body = self.request(i)
                async with gate:
                    while time.monotonic() < stop_at:
                        started = time.monotonic()
                        try:
                            r = await client.post(f"{base}/api/v2/chat/completions", json=body)
                            status = r.status_code
                        except httpx.TransportError:
                            status = 0
                        self.attempts.append((started, status))
                        if status == 200:
                            self.acknowledged[rid] = str(body["conv_uid"])
                            if len(self.acknowledged) >= self.progress_at:
                                self.progress.set()
                            return
                        await asyncio.sleep(0.05 if status == 409 else 0.1)

            await asyncio.gather(*(one(i) for i in range(self.turns)))

    def five_xx_after_recovery(self) -> int:
        if self.recovered_at is None:
            return sum(1 for _, s in self.attempts if s >= 500)
        return sum(1 for t, s in self.attempts if t >= self.recovered_at and s >= 500)


async def wait_ready(base: str, timeout: float = 30.0) -> float:
    """Poll ``/readyz`` until it says 200; the time it did."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                if (await client.get(f"{base}/readyz")).status_code == 200:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{base} was not ready again within {timeout} s")
            await asyncio.sleep(0.05)


def expected_reply(request_id: str) -> str:
    """The start of what the local model answers to ``q <request_id>``."""
    return f"You said: q {request_id}"


async def audit_case(
    case: str, store: ConversationStore, acknowledged: dict[str, str], five_xx: int, note: str = ""
) -> FaultRow:
    """Every conversation the case wrote, checked against what was acknowledged; the row is recorded."""
    stored = lost = half = duplicated = 0
    for conv in sorted(set(acknowledged.values())):
        messages = await store.read_messages(conv)
        acked = [rid for rid, c in acknowledged.items() if c == conv]
        report = audit_messages(messages, expected_turns=acked, unique_inputs=True)
        stored += report.turns
        lost += report.lost
        duplicated += report.duplicated
        half += report.split
        for user, reply in zip(messages[::2], messages[1::2], strict=False):
            rid = user.content.removeprefix("q ")
            if user.role != "user" or reply.role != "assistant" or not reply.content.startswith(expected_reply(rid)):
                half += 1
    row = FaultRow(case, len(acknowledged), stored, lost, half, duplicated, five_xx, note)
    ROWS.append(row)
    return row
