"""``convcore`` command: ``demo``, ``serve`` and ``bench``.

``serve`` and ``bench`` live in their own packages and are imported only
when asked for, so the core stays free of web and benchmark dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence

from .bootstrap import DEFAULT_STORE_URL, open_engine
from .errors import ConvcoreError, MissingDependencyError

__all__ = ["main"]

_DEMO_TURNS: list[str | list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Hi, I'm Ada."},
    ],
    "What is a context window?",
    "And what did I tell you my name was?",
]


async def _demo(store_url: str) -> int:
    async with open_engine(store_url) as engine:
        conv_uid = None
        for i, messages in enumerate(_DEMO_TURNS, 1):
            reply = await engine.chat({"messages": messages, "conv_uid": conv_uid, "user_name": "demo"})
            conv_uid = reply.conv_uid
            shown = messages if isinstance(messages, str) else messages[-1]["content"]
            print(f"turn {i} user: {shown}")
            print(f"turn {i} assistant: {reply.content}")
            print(f"        usage: {reply.usage.model_dump()}")
        print("streamed turn 4: ", end="", flush=True)
        async for chunk in engine.chat_stream(
            {"messages": "Stream this reply, please.", "conv_uid": conv_uid}
        ):
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
        assert conv_uid is not None
        conv = await engine.get_conversation(conv_uid)
        print(
            f"conversation {conv.conv_uid}: {conv.message_count} messages, "
            f"{conv.total_tokens} tokens stored in {store_url}"
        )
    return 0


def _delegate(command: str, module: str, extra: str, argv: Sequence[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        err = MissingDependencyError(f"'convcore {command}'", extra)
        print(f"convcore: {err} ({exc})", file=sys.stderr)
        return 2
    result: int = mod.main(list(argv))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        return _delegate("serve", "convcore_server.cli", "server", args[1:])
    if args and args[0] == "bench":
        return _delegate("bench", "benchmarks.cli", "bench", args[1:])
    parser = argparse.ArgumentParser(prog="convcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a short multi-turn conversation and print it")
    demo.add_argument(
        "--store",
        default=os.environ.get("CONVCORE_STORE_URL", DEFAULT_STORE_URL),
        help="store URL (default: $CONVCORE_STORE_URL or %(default)s)",
    )
    sub.add_parser("serve", help="run the HTTP service (see convcore serve --help)")
    sub.add_parser("bench", help="run load benchmarks (see convcore bench --help)")
    ns = parser.parse_args(args)
    try:
        return asyncio.run(_demo(ns.store))
    except ConvcoreError as exc:
        print(f"convcore: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
