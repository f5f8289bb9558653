"""What a child process of the cross-process test runs. Kept apart from the
test module so a spawned child imports only convcore and its Redis store."""

from __future__ import annotations

import asyncio

from convcore import Engine, default_registry, open_store

__all__ = ["run_turns"]


def run_turns(url: str, conv_uid: str, worker: int, turns: int) -> list[str]:
    """``turns`` concurrent turns on ``conv_uid``; the request ids that returned."""

    async def main() -> list[str]:
        async with Engine(open_store(url), default_registry(), owned=True) as engine:
            ids = [f"p{worker}-t{i}" for i in range(turns)]
            await asyncio.gather(
                *(
                    engine.chat({"messages": f"q {rid}", "conv_uid": conv_uid, "request_id": rid})
                    for rid in ids
                )
            )
            return ids

    return asyncio.run(main())
