"""Time to first byte of a streamed turn, against the backend's own time to first token.

A streamed turn answers 200 only once the backend has produced its first
event, so its first byte waits for the backend; the promise is that this adds
no more than the backend's own time to first token (TTFT). This measures it:
each source tree given (``--tree``, e.g. a ``git archive`` of an older commit,
and the tree this file is in) serves ``POST /api/v2/chat/completions`` under
uvicorn on loopback, in a process of its own, over the local model with a set
first-token latency. A raw client times the first body byte of each streamed
turn and its first reply text (the request in one write, on a fresh
connection: no Nagle delay), and the backend times its own first token
inside the server. Trees take turns, round by round, so they see the same
machine load.

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/stream_ttfb.py --tree /tmp/before --tree . --latency 0,0.05,0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

KEY = "ttfb-key"
TEXT = re.compile(rb'"content":"[^"]')  # a chunk carrying some of the reply
BODY = {"model": "convcore-local", "messages": "How fast is the first byte?", "stream": True}


def _child(tree: str, latency: float, samples: int) -> dict[str, list[float]]:
    """In the child process: serve ``tree``'s code, time TTFB and the backend's TTFT."""
    sys.path[:0] = [tree, str(Path(tree) / "adapters")]
    import uvicorn

    from convcore import Engine, LocalBackend, MemoryStore, ModelRegistry, ModelSpec
    from convcore.generation import GenerationChunk, GenerationRequest
    from convcore_server import create_app

    ttft: list[float] = []

    class TimedBackend(LocalBackend):
        """The local model, timing its own first token inside the server."""

        async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
            start = time.perf_counter()
            first = True
            async with aclosing(super().stream(request)) as chunks:
                async for chunk in chunks:
                    if first:
                        ttft.append(time.perf_counter() - start)
                        first = False
                    yield chunk

    backend = TimedBackend(latency=latency)
    registry = ModelRegistry([ModelSpec(name="convcore-local", backend=backend, context_window=8192)])
    app = create_app(Engine(MemoryStore(), registry), api_keys=[KEY])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)

    body = json.dumps(BODY).encode()
    request = (
        f"POST /api/v2/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body

    async def first_byte() -> tuple[float, float]:
        """Seconds from sending the request (one write, no Nagle) to the
        first byte of the body, and to the first byte of the reply's text,
        on a fresh connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")
        seen = await reader.readexactly(1)
        first = time.perf_counter() - start
        while not TEXT.search(seen):
            seen += await reader.read(4096)
        text = time.perf_counter() - start
        await reader.read()
        writer.close()
        await writer.wait_closed()
        return first, text

    async def run() -> dict[str, list[float]]:
        times = [await first_byte() for _ in range(samples + 3)][3:]  # the first three warm up
        return {"ttfb": [t[0] for t in times], "text": [t[1] for t in times], "ttft": ttft[3:]}

    try:
        return asyncio.run(run())
    finally:
        server.should_exit = True


def _measure(tree: str, latency: float, samples: int) -> dict[str, list[float]]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", tree, "--latency", str(latency), "--samples", str(samples)],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    )
    result: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", help="a source tree to serve (repeatable)")
    parser.add_argument("--latency", default="0,0.05,0.2", help="backend first-token latencies, seconds")
    parser.add_argument("--samples", type=int, default=20, help="timed turns per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, float(args.latency), args.samples)))
        return
    trees = [str(Path(t).resolve()) for t in args.tree or [str(Path(__file__).resolve().parents[1])]]
    print("latency  tree                      TTFB p50   text p50   TTFT p50   growth/TTFT  growth-TTFT")
    for latency in (float(x) for x in args.latency.split(",")):
        got = {t: {"ttfb": [], "text": [], "ttft": []} for t in trees}
        for _ in range(args.rounds):
            for tree in trees:
                for k, v in _measure(tree, latency, args.samples).items():
                    got[tree][k] += v
        base = statistics.median(got[trees[0]]["ttfb"])
        for tree in trees:
            ttfb, text, ttft = (statistics.median(got[tree][k]) for k in ("ttfb", "text", "ttft"))
            ratio = (ttfb - base) / ttft if ttft > 0.001 else float("nan")
            excess = (ttfb - base - ttft) * 1000
            print(
                f"{latency:7.3f}  {tree[-24:]:24}  {ttfb * 1000:7.2f} ms {text * 1000:7.2f} ms"
                f" {ttft * 1000:7.2f} ms  {ratio:10.2f}  {excess:8.2f} ms"
            )


if __name__ == "__main__":
    main()
