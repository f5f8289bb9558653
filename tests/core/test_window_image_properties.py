"""Property tests: the budget holds with images counted, and images stay with their message.

The expected cost of each image is worked out here from OpenAI's published
formula, independently of convcore's own implementation, and text is
recounted from scratch by tiktoken.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import zlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import ContextOverflowError, Engine, MemoryStore, ModelRegistry, ModelSpec, get_tokenizer
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS

TOK = get_tokenizer("cl100k_base")
words = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=30).filter(lambda t: t.strip() != "")


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )


def reference_image_cost(size: tuple[int, int] | None, detail: str | None) -> int:
    """OpenAI's tiled formula as its docs state it; the maximum for an unknown size."""
    if detail == "low":
        return 85
    if size is None:
        return 85 + 170 * 8
    w, h = size
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


@st.composite
def images(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    detail = draw(st.sampled_from([None, "low", "high", "auto"]))
    if draw(st.booleans()):
        size = (draw(st.integers(1, 5000)), draw(st.integers(1, 5000)))
        url = "data:image/png;base64," + base64.b64encode(png_header(*size)).decode()
    else:
        size, url = None, f"https://example.com/{draw(st.integers(0, 99))}.jpg"
    image: dict[str, Any] = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image}, reference_image_cost(size, detail)


@st.composite
def turns(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A user message, maybe with images, and its images' expected cost."""
    text = draw(words)
    pictures = draw(st.lists(images(), max_size=2))
    if not pictures:
        return {"role": "user", "content": text}, 0
    parts = [{"type": "text", "text": text}, *(p for p, _ in pictures)]
    return {"role": "user", "content": parts}, sum(c for _, c in pictures)


def exact_tokens(messages: Any, image_cost: dict[str, int]) -> int:
    total = REPLY_PRIMING_TOKENS
    for m in messages:
        total += 3 + len(TOK.encode(m.role)) + len(TOK.encode(m.content))
        total += image_cost.get(m.content, 0) if m.parts else 0
    return total


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(turns(), min_size=1, max_size=12),
    st.integers(min_value=100, max_value=6000),
    st.integers(min_value=1, max_value=300),
)
def test_prompts_with_images_respect_the_budget_and_keep_images_with_their_message(
    inputs: list[tuple[dict[str, Any], int]], window: int, max_new: int
) -> None:
    async def run() -> None:
        backend = RecordingBackend()
        store = MemoryStore()
        spec = ModelSpec(
            name="m", backend=backend, context_window=window, max_new_tokens=min(max_new, window - 1)
        )
        engine = Engine(store, ModelRegistry([spec]))
        image_cost: dict[str, int] = {}
        sent_parts: dict[str, Any] = {}
        for n, (message, cost) in enumerate(inputs):
            # A unique text per turn names the message, so its images can be found again.
            message = _tagged(message, f"t{n} ")
            text = (
                message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
            )
            image_cost[text] = cost
            try:
                reply = await engine.chat({"messages": [message], "conv_uid": "prop"})
            except ContextOverflowError as err:
                assert err.required_tokens == exact_tokens([_as_prompt(message, text)], image_cost)
                assert err.required_tokens + spec.max_new_tokens > window
                continue
            if cost:
                sent_parts[text] = message["content"]
            sent = backend.requests[-1].messages
            assert exact_tokens(sent, image_cost) == reply.usage.prompt_tokens
            assert reply.usage.prompt_tokens + spec.max_new_tokens <= window
            for m in sent:
                if m.role == "user" and m.content in sent_parts:
                    dumped = [p.model_dump(mode="json", exclude_none=True) for p in m.parts or ()]
                    assert dumped == sent_parts[m.content], "an image in the window is the one sent with it"
            assert sent[0].role == "user", "the window starts at a whole round"

    asyncio.run(run())


def _tagged(message: dict[str, Any], tag: str) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": tag + content}
    return {**message, "content": [{"type": "text", "text": tag + content[0]["text"]}, *content[1:]]}


class _Prompt:
    def __init__(self, role: str, content: str, parts: bool) -> None:
        self.role, self.content, self.parts = role, content, parts


def _as_prompt(message: dict[str, Any], text: str) -> _Prompt:
    return _Prompt("user", text, not isinstance(message["content"], str))
