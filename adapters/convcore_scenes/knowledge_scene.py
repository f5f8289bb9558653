"""chat_knowledge: answer from a knowledge space. chat_param is the space name.

The best BM25 chunks go in as context blocks in rank order; the engine keeps
as many whole ones as the budget allows, and ``finish`` lists the ones that
made it into the prompt (``Sources: doc 'x' chunk 2, …``).
"""

from __future__ import annotations

from convcore.errors import InvalidRequestError
from convcore.scenes import ScenePlan, SceneRequest

from .knowledge import Chunk, KnowledgeBase

__all__ = ["KnowledgeScene"]


class KnowledgeScene:
    """``chat_knowledge``: retrieved chunks as context, their sources appended."""

    name = "chat_knowledge"
    needs_param = True

    def __init__(self, knowledge: KnowledgeBase, *, top_k: int = 12, max_context_share: float = 0.6) -> None:
        self.knowledge = knowledge
        self.top_k = top_k
        self.max_context_share = max_context_share

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        name = (request.param or "").strip()
        space = await self.knowledge.find_space(name, caller=request.caller)
        if space is None:
            raise InvalidRequestError(f"no knowledge space named {name!r}", field="chat_param")
        hits = await self.knowledge.search(space, request.question, self.top_k)
        chunks = tuple(h.chunk for h in hits)
        system = (
            f'Answer from the knowledge space "{space.name}". The passages below were retrieved for the '
            "question, the most relevant first. Use only what they say; if they do not hold the answer, "
            "say that you do not know."
        )
        if not chunks:
            system += " (Nothing in the space matched this question.)"
        return ScenePlan(
            system_prompt=system,
            context=tuple(f"[{c.label()}]\n{c.text}" for c in chunks),
            max_context_share=self.max_context_share,
            state=chunks,
        )

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        chunks: tuple[Chunk, ...] = plan.state if isinstance(plan.state, tuple) else ()
        used = chunks[:used_context]
        if used:
            return f"{reply}\n\nSources: " + ", ".join(c.label() for c in used)
        if chunks:
            return f"{reply}\n\nSources: none (no passage fit the context budget)"
        return f"{reply}\n\nSources: none (nothing in the space matched)"
