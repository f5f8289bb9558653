"""Images, audio and files in messages: stored, counted, windowed, sent, bounded."""

from __future__ import annotations

import base64
import io
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convcore import Engine, InvalidRequestError, MemoryStore, ModelRegistry, ModelSpec
from convcore.content import (
    AUDIO_TOKENS_PER_SECOND,
    AudioPart,
    ImagePart,
    ImageURL,
    image_size,
    image_tokens,
    part_tokens,
)
from convcore.testing import RecordingBackend
from convcore.tokens import count_message, get_tokenizer

pytestmark = pytest.mark.anyio


def image_bytes(fmt: str, size: tuple[int, int], **options: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format=fmt, **options)
    return out.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def wav(seconds: float, rate: int = 8000) -> bytes:
    samples = b"\x00\x00" * int(rate * seconds)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(samples))
    return b"RIFF" + struct.pack("<I", len(body) + len(samples)) + body + samples


def image_message(
    url: str, text: str = "What is in this image?", detail: str | None = None
) -> dict[str, Any]:
    image: dict[str, Any] = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": image}],
    }


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True, "exif": b"Exif\x00\x00" + b"\x00" * 40_000}),
        ("GIF", {}),
        ("WEBP", {"lossless": False}),
        ("WEBP", {"lossless": True}),
    ],
    ids=["png", "jpeg", "jpeg-exif-progressive", "gif", "webp-lossy", "webp-lossless"],
)
@pytest.mark.parametrize("size", [(1, 1), (640, 480), (3000, 17)])
def test_image_dimensions_are_read_from_real_headers(
    fmt: str, options: dict[str, Any], size: tuple[int, int]
) -> None:
    assert image_size(image_bytes(fmt, size, **options)) == size


def test_webp_with_alpha_uses_the_extended_header() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (321, 123), (0, 0, 0, 0)).save(out, format="WEBP", lossless=False, exact=True)
    assert image_size(out.getvalue()) == (321, 123)


def test_image_tokens_follow_openais_worked_examples() -> None:
    assert image_tokens((1024, 1024), "high") == 765  # 768x768: 4 tiles
    assert image_tokens((2048, 4096), "high") == 1105  # 1024x2048 -> 768x1536: 6 tiles
    assert image_tokens((4096, 8192), "low") == 85
    assert image_tokens((100, 100), None) == 255  # one tile; auto counts as high
    assert image_tokens(None, "high") == image_tokens(None, "auto") == 1445  # the formula's largest
    assert image_tokens(None, "low") == 85


def test_audio_and_file_parts_are_counted_by_the_documented_rule() -> None:
    tok = get_tokenizer()
    audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav(2.5)).decode(), "format": "wav"},
    }
    file = {
        "type": "file",
        "file": {"file_data": data_url(b"x" * 400, "application/pdf"), "filename": "a.pdf"},
    }
    engine_request = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, audio, file]}]
    }
    from convcore.schema import parse_chat_request

    parts = parse_chat_request(engine_request).input_messages[0].parts
    assert parts is not None
    assert part_tokens(parts[1]) == 2.5 * AUDIO_TOKENS_PER_SECOND
    assert part_tokens(parts[2], tok.count) == 100 + tok.count("a.pdf")


def make_engine(**options: Any) -> tuple[Engine, RecordingBackend]:
    backend = RecordingBackend()
    spec = ModelSpec(name="gpt-4o-mini", backend=backend, context_window=8192, encoding="cl100k_base")
    return Engine(MemoryStore(), ModelRegistry([spec]), **options), backend


async def test_an_image_is_stored_counted_and_kept_in_the_next_turns_window() -> None:
    engine, backend = make_engine()
    png = image_bytes("PNG", (1024, 1024))
    first = await engine.chat({"messages": [image_message(data_url(png, "image/png"), detail="high")]})
    assert first.content == "You said: What is in this image? [image_url]"
    stored = await engine.read_messages(first.conv_uid)
    question = stored[0]
    assert question.parts is not None and question.content == "What is in this image?"
    text_cost = count_message(get_tokenizer(), "user", question.content)
    assert question.token_count == text_cost + 765
    assert first.usage.prompt_tokens == question.token_count + 3

    second = await engine.chat({"messages": "And its colour?", "conv_uid": first.conv_uid})
    sent = backend.requests[-1].messages
    assert [m.role for m in sent] == ["user", "assistant", "user"]
    assert sent[0].parts == question.parts, "the image stays in the window with its message"
    assert (
        second.usage.prompt_tokens
        == sum(m.token_count for m in stored) + count_message(get_tokenizer(), "user", "And its colour?") + 3
    )


async def test_an_image_that_does_not_fit_leaves_the_window_with_its_whole_round() -> None:
    backend = RecordingBackend()
    spec = ModelSpec(
        name="m", backend=backend, context_window=1600, max_new_tokens=100, encoding="cl100k_base"
    )
    engine = Engine(MemoryStore(), ModelRegistry([spec]))
    first = await engine.chat({"messages": [image_message("https://example.com/cat.png")]})
    await engine.chat({"messages": "second", "conv_uid": first.conv_uid})
    assert backend.requests[-1].messages[0].parts is not None  # 1445 + text fits in 1500
    await engine.chat({"messages": "x " * 200, "conv_uid": first.conv_uid})
    window = backend.requests[-1].messages
    assert all(m.parts is None for m in window), "no room: the image's round left whole"
    assert window[0].role == "user"


async def test_large_inline_data_is_refused_naming_the_limit() -> None:
    engine, backend = make_engine(max_inline_bytes=2000)
    small = data_url(image_bytes("PNG", (8, 8)), "image/png")
    await engine.chat({"messages": [image_message(small)]})
    big = data_url(image_bytes("PNG", (64, 64), compress_level=0), "image/png")
    assert len(big) > 2000
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat({"messages": [image_message(big)]})
    assert info.value.field == "messages.0.content.1.image_url.url"
    assert "max_inline_bytes" in str(info.value) and "2000" in str(info.value)
    audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav(1)).decode(), "format": "wav"},
    }
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat({"messages": [{"role": "user", "content": [audio]}]})
    assert info.value.field == "messages.0.content.0.input_audio.data"
    assert len(backend.requests) == 1, "refused before the model was asked"


@pytest.mark.parametrize(
    ("part", "field"),
    [
        ({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}, "messages.0.content.1.image_url"),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
            "messages.0.content.1.image_url",
        ),
        (
            {"type": "image_url", "image_url": {"url": data_url(b"not an image", "image/png")}},
            "messages.0.content.1.image_url",
        ),
        (
            {"type": "image_url", "image_url": {"url": data_url(b"%PDF-1.4", "application/pdf")}},
            "messages.0.content.1.image_url",
        ),
        ({"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "ultra"}}, None),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}, None),
        ({"type": "file", "file": {"filename": "a.pdf"}}, "messages.0.content.1.file"),
        ({"type": "video", "video": {}}, "messages.0.content.1"),
    ],
    ids=[
        "scheme",
        "base64",
        "not-image",
        "not-image-type",
        "detail",
        "audio-format",
        "file-empty",
        "unknown-type",
    ],
)
async def test_bad_parts_are_refused_naming_where(part: dict[str, Any], field: str | None) -> None:
    engine, backend = make_engine()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]}
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat(body)
    assert info.value.field is not None and info.value.field.startswith(field or "messages.0.content.1")
    assert not backend.requests


async def test_media_parts_belong_in_user_messages() -> None:
    engine, _ = make_engine()
    part = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat(
            {"messages": [{"role": "system", "content": [part]}, {"role": "user", "content": "hi"}]}
        )
    assert info.value.field == "messages.0" and "user messages" in str(info.value)


async def test_text_only_part_lists_are_plain_text_as_before() -> None:
    engine, backend = make_engine()
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    }
    reply = await engine.chat(body)
    (message,) = (await engine.read_messages(reply.conv_uid))[:1]
    assert message.content == "ab" and message.parts is None
    assert backend.requests[0].messages[0].parts is None


async def test_an_image_only_message_is_input() -> None:
    engine, _ = make_engine()
    part = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    reply = await engine.chat({"messages": [{"role": "user", "content": [part]}]})
    assert reply.content == "You said:  [image_url]"
    (message, _) = await engine.read_messages(reply.conv_uid)
    assert message.token_count == count_message(get_tokenizer(), "user", "") + 85


async def test_a_retried_request_with_other_parts_is_a_conflict() -> None:
    from convcore import ConflictError

    engine, _ = make_engine()
    body = {"messages": [image_message("https://x/a.png")], "request_id": "r1"}
    first = await engine.chat(body)
    again = await engine.chat({**body, "conv_uid": first.conv_uid})
    assert again.duplicate
    with pytest.raises(ConflictError):
        await engine.chat(
            {"messages": [image_message("https://x/b.png")], "request_id": "r1", "conv_uid": first.conv_uid}
        )


def test_an_image_part_dumps_as_sent() -> None:
    part = ImagePart(type="image_url", image_url=ImageURL(url="https://x/a.png"))
    assert part.model_dump(mode="json", exclude_none=True) == {
        "type": "image_url",
        "image_url": {"url": "https://x/a.png"},
    }


async def test_a_parts_key_sent_beside_text_content_is_not_a_part() -> None:
    engine, backend = make_engine()
    smuggled = [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]
    reply = await engine.chat({"messages": [{"role": "user", "content": "hi", "parts": smuggled}]})
    assert reply.content == "You said: hi"
    assert backend.requests[0].messages[0].parts is None


_PREFIXES = [
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"\xff\xd8",
    b"RIFF\x00\x00\x00\x00WAVE",
    b"",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_PREFIXES), st.binary(max_size=64))
def test_headers_of_any_bytes_are_read_or_refused_never_crash(prefix: bytes, rest: bytes) -> None:
    data = (prefix + rest) or b"\x00"
    size = image_size(data)
    assert size is None or all(isinstance(n, int) and n >= 0 for n in size)
    audio = AudioPart.model_validate(
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}
    )
    assert part_tokens(audio) >= 0
