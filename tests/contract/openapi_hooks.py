"""Schemathesis hooks for the conformance run: the one exception in code.

The chat routes check three things about a request that no JSON Schema can
state; everything else about it is in the document, and checked:

1. The *order* of a conversation's messages (a schema has no "last item"
   and no "an item after one that ..."): the last message is the new input
   (a user message with text, or tool results), and each tool result
   answers a call of the assistant message before it, by a tool_call_id the
   generator cannot correlate.
2. That the prompt fits the model's context window beside the reply budget:
   a relation between the texts' token counts and max_new_tokens. (The
   document bounds the budget by the window.)
3. That an inline image (a data: URL) holds a readable PNG, JPEG, GIF or
   WebP image: a property of the bytes.

Schema-valid (positive) cases that break one of these are not sent, so the
400 they get is not counted as valid data rejected. Every other case, and
every negative one, is sent as generated.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

CHAT_OPERATIONS = {
    "POST /api/v2/chat/completions",
    "POST /api/knowledge/chat/completions",
    "POST /api/v2/serve/awel/flows/{uid}/run",  # a chat request, run on the flow in the path
}
# The smallest context window of the service's models (set by the test).
WINDOW = int(os.environ.get("CONVCORE_CONTEXT_WINDOW", "0"))
BUDGETS = ("max_new_tokens", "max_completion_tokens", "max_tokens")


def _texts(value: Any) -> list[str]:
    """Every string in ``value``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def _fits(body: dict[str, Any]) -> bool:
    """Whether the prompt surely fits beside the reply budget (a token is
    at most 4 per character of text, with room for each message's frame)."""
    budget = next((body[b] for b in BUDGETS if isinstance(body.get(b), int) and body[b]), None)
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 1
    prompt = 4 * sum(len(t) for t in _texts(messages)) + 16 * count + 64
    return prompt + (budget or WINDOW // 2) <= WINDOW


def _inline_image(messages: list[Any]) -> bool:
    return any(
        isinstance(p, dict) and str((p.get("image_url") or {}).get("url", "")).startswith("data:")
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
    )


def _in_order(messages: list[Any]) -> bool:
    if not all(isinstance(m, dict) for m in messages):
        return True  # not a positive case's list; leave it to the service
    if any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
        return False  # results and calls pair by ids the generator cannot correlate
    last = messages[-1] if messages else {}
    content = last.get("content")
    has_text = isinstance(content, str) and content.strip() != ""
    has_parts = isinstance(content, list) and any(
        isinstance(p, dict) and (p.get("type") != "text" or str(p.get("text", "")).strip()) for p in content
    )
    return last.get("role") == "user" and (has_text or has_parts)


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    meta = case.meta
    if (
        case.operation.label not in CHAT_OPERATIONS
        or meta is None
        or meta.generation.mode.value != "positive"
    ):
        return True
    body = case.body
    if not isinstance(body, dict):
        return True
    if not _fits(body):
        return False
    messages = body.get("messages")
    return not isinstance(messages, list) or (_in_order(messages) and not _inline_image(messages))
