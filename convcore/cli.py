"""``convcore`` command: ``demo``, and what installed packages add.

Other subcommands (``serve``, ``bench``) are registered in the
``convcore.commands`` entry-point group by the packages that hold them and
imported only when asked for, so the core stays free of web and benchmark
dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from . import plugins
from .bootstrap import DEFAULT_STORE_URL, open_engine
from .errors import ConvcoreError, MissingDependencyError
from .local import LocalBackend

__all__ = ["main"]

_DEMO_TURNS: list[str | list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Hi, I'm Ada."},
    ],
    "What is a context window?",
    "And what did I tell you my name was?",
]


async def _demo(store_url: str, models: str | None, model: str | None) -> int:
    async with open_engine(store_url, models=models) as engine:
        spec = engine.models.get(model)
        print(f"model: {spec.name} (upstream {spec.upstream!r}, context window {spec.context_window})")
        if isinstance(spec.backend, LocalBackend):
            print(
                "  the built-in echo model repeats your input and says what history it saw; "
                "set CONVCORE_MODELS or --models to talk to a real model (see README)"
            )
        conv_uid = None
        for i, messages in enumerate(_DEMO_TURNS, 1):
            body = {"messages": messages, "conv_uid": conv_uid, "user_name": "demo", "model": spec.name}
            reply = await engine.chat(body)
            conv_uid = reply.conv_uid
            shown = messages if isinstance(messages, str) else messages[-1]["content"]
            print(f"turn {i} user: {shown}")
            print(f"turn {i} assistant: {reply.content}")
            print(f"        usage: {reply.usage.model_dump()}")
        print("streamed turn 4: ", end="", flush=True)
        async for chunk in engine.chat_stream(
            {"messages": "Stream this reply, please.", "conv_uid": conv_uid, "model": spec.name}
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


def _delegate(command: str, argv: Sequence[str]) -> int:
    try:
        entry = plugins.load(plugins.COMMANDS, command, f"'convcore {command}'")
    except MissingDependencyError as exc:
        print(f"convcore: {exc} ({exc.__cause__})", file=sys.stderr)
        return 2
    if entry is None:  # uninstalled since main() looked
        print(f"convcore: no installed package provides 'convcore {command}'", file=sys.stderr)
        return 2
    result: int = entry(list(argv))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = plugins.names(plugins.COMMANDS)
    if args and args[0] in commands:
        return _delegate(args[0], args[1:])
    parser = argparse.ArgumentParser(prog="convcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a short multi-turn conversation and print it")
    demo.add_argument(
        "--store",
        default=os.environ.get("CONVCORE_STORE_URL", DEFAULT_STORE_URL),
        help="store URL (default: $CONVCORE_STORE_URL or %(default)s)",
    )
    demo.add_argument(
        "--models", default=None, help="models file, TOML or JSON (default: $CONVCORE_MODELS, a path or JSON)"
    )
    demo.add_argument("--model", default=None, help="the model to talk to (default: the first one)")
    for name in commands:
        sub.add_parser(name, help=f"see convcore {name} --help")
    ns = parser.parse_args(args)
    try:
        return asyncio.run(_demo(ns.store, ns.models, ns.model))
    except ConvcoreError as exc:
        print(f"convcore: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
