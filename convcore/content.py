"""Content parts: images, audio and files in a message, and what they cost.

A message's content may be OpenAI's list of parts. Text parts are the
message's text; the others are kept as sent, stored with the message and
passed to backends, and counted by these rules (an upper bound wherever the
real count cannot be known offline, so a window's budget always holds):

- **image_url**: OpenAI's published formula for its tiled vision models.
  ``detail="low"`` is 85 tokens. Otherwise (``high``, ``auto`` or unset,
  counted as high) the image is scaled to fit 2048x2048, then down so its
  shortest side is at most 768, and costs 85 + 170 per 512-pixel tile. The
  dimensions come from the header of a data URL's PNG, JPEG, GIF or WebP
  image; an image by http(s) URL is not fetched, so it is counted at the
  formula's maximum, 8 tiles: 1445 tokens (85 when ``low``). These are the
  rates of gpt-4o, gpt-4.1 and their like; models that bill images at other
  rates (gpt-4o-mini's are about 33 times higher, and the patch-counted
  gpt-4.1-mini/nano and o4-mini differ) are still counted at these, so give
  such a model a context_window margin; the backend's ``usage`` reports its
  own count.
- **input_audio**: 10 tokens a second (OpenAI publishes no exact rule).
  A WAV's length is read from its header; an MP3 is bounded by its size at
  8 kbit/s, the lowest MP3 bitrate.
- **file**: the filename's tokens plus one token per 4 bytes of inline
  data (text runs at about 4 bytes a token); a ``file_id`` reference adds
  nothing more, as its content is not known here.

Inline data (data URLs, base64 audio) is bounded by a caller's limit, so
a message cannot carry more than the store and every later window should
hold: :func:`check_inline_sizes` refuses it, naming the limit.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import InvalidRequestError

__all__ = [
    "DEFAULT_MAX_INLINE_BYTES",
    "AudioPart",
    "ContentPart",
    "FilePart",
    "FileRef",
    "ImagePart",
    "ImageURL",
    "InputAudio",
    "TextPart",
    "check_inline_sizes",
    "image_size",
    "image_tokens",
    "part_tokens",
    "parts_text",
]

DEFAULT_MAX_INLINE_BYTES = 2 * 1024 * 1024  # below the HTTP service's default body limit
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
AUDIO_TOKENS_PER_SECOND = 10
_MAX_IMAGE_TILES = 8  # 2048x768 after scaling: the formula's largest image
_IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp"}

_PART = ConfigDict(frozen=True, extra="forbid")
# Base64 as RFC 4648 writes it (padded, no line breaks); the one rule the
# validators check and the JSON schema states.
BASE64 = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
_BASE64 = re.compile(BASE64)
# What pydantic says of a value these patterns refuse, said readably.
PATTERN_MEANS = {
    "^(?:https?://|data:)": "must be an http(s) URL or a data: URL",
    f"^{BASE64}$": "inline data must be valid base64",
    f"^(?:data:[^,]*;base64,)?{BASE64}$": "must be a data:<type>;base64,<data> URL or base64",
}
_URL, _DATA, _FILE_DATA = PATTERN_MEANS


class TextPart(BaseModel):
    model_config = _PART

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """An http(s) URL, or a ``data:image/...;base64,`` URL of a PNG, JPEG, GIF or WebP image."""

    model_config = _PART

    url: str = Field(min_length=1, pattern=_URL)
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _readable(cls, url: str) -> str:
        if url.startswith("data:"):
            mime, data = _data_url(url)
            if mime not in _IMAGE_TYPES:
                raise ValueError(f"an image data URL must be PNG, JPEG, GIF or WebP, not {mime or 'untyped'}")
            if image_size(data) is None:
                raise ValueError(f"the data URL does not hold a readable {mime} image")
        elif not url.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL or a data: URL")
        return url


class ImagePart(BaseModel):
    model_config = _PART

    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    model_config = _PART

    data: str = Field(min_length=1, pattern=_DATA)  # base64, as OpenAI takes it
    format: Literal["wav", "mp3"]

    @field_validator("data")
    @classmethod
    def _base64(cls, data: str) -> str:
        _b64decode(data)
        return data


class AudioPart(BaseModel):
    model_config = _PART

    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        # What _some_file checks, in the schema.
        json_schema_extra={
            "anyOf": [
                {"required": ["file_data"], "properties": {"file_data": {"type": "string"}}},
                {"required": ["file_id"], "properties": {"file_id": {"type": "string"}}},
            ]
        },
    )

    # A data URL (or bare base64).
    file_data: str | None = Field(default=None, pattern=_FILE_DATA)
    file_id: str | None = None
    filename: str | None = None

    @model_validator(mode="after")
    def _some_file(self) -> FileRef:
        if self.file_data is None and self.file_id is None:
            raise ValueError("a file part needs file_data or file_id")
        if self.file_data is not None:
            _inline_bytes(self.file_data)
        return self


class FilePart(BaseModel):
    model_config = _PART

    type: Literal["file"]
    file: FileRef


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]


def parts_text(parts: Sequence[ContentPart]) -> str:
    """The message's text: its text parts, joined."""
    return "".join(p.text for p in parts if isinstance(p, TextPart))


def part_tokens(part: ContentPart, count_text: Callable[[str], int] | None = None) -> int:
    """A non-text part's prompt cost by the rules above (text parts: 0, as
    they are counted with the message's text). ``count_text`` counts a
    filename (a ``Tokenizer.count``); without it a filename counts nothing."""
    if isinstance(part, ImagePart):
        url, detail = part.image_url.url, part.image_url.detail
        size = image_size(_data_url(url)[1]) if url.startswith("data:") else None
        return image_tokens(size, detail)
    if isinstance(part, AudioPart):
        data = _b64decode(part.input_audio.data)
        seconds = _wav_seconds(data) if part.input_audio.format == "wav" else None
        if seconds is None:
            seconds = len(data) * 8 / 8000
        return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)
    if isinstance(part, FilePart):
        n = 0
        if part.file.filename and count_text is not None:
            n += count_text(part.file.filename)
        if part.file.file_data is not None:
            n += math.ceil(len(_inline_bytes(part.file.file_data)) / 4)
        return n
    return 0


def image_tokens(size: tuple[int, int] | None, detail: str | None = None) -> int:
    """OpenAI's image cost for ``size`` (width, height) at ``detail``;
    the largest cost the formula gives when the size is not known."""
    if detail == "low":
        return IMAGE_BASE_TOKENS
    if size is None:
        return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * _MAX_IMAGE_TILES
    width, height = float(max(size[0], 1)), float(max(size[1], 1))
    if max(width, height) > 2048:
        scale = 2048 / max(width, height)
        width, height = width * scale, height * scale
    if min(width, height) > 768:
        scale = 768 / min(width, height)
        width, height = width * scale, height * scale
    tiles = math.ceil(width / 512) * math.ceil(height / 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def check_inline_sizes(parts: Sequence[ContentPart], limit: int, field: str) -> None:
    """Refuse any inline data longer than ``limit`` characters (as sent),
    naming the part and the limit ``max_inline_bytes``."""
    for j, part in enumerate(parts):
        where, value = _inline_of(part)
        if value is not None and len(value) > limit:
            raise InvalidRequestError(
                f"holds {len(value)} bytes of inline data; the limit (max_inline_bytes) is {limit}",
                field=f"{field}.{j}.{where}",
            )


def _inline_of(part: ContentPart) -> tuple[str, str | None]:
    if isinstance(part, ImagePart) and part.image_url.url.startswith("data:"):
        return "image_url.url", part.image_url.url
    if isinstance(part, AudioPart):
        return "input_audio.data", part.input_audio.data
    if isinstance(part, FilePart):
        return "file.file_data", part.file.file_data
    return "", None


def _b64decode(data: str) -> bytes:
    if _BASE64.fullmatch(data) is None:
        raise ValueError("inline data must be valid base64")
    return base64.b64decode(data)


def _data_url(url: str) -> tuple[str, bytes]:
    """(media type, bytes) of a ``data:<type>;base64,<data>`` URL."""
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError("a data URL must be data:<type>;base64,<data>")
    mime = header[len("data:") :].split(";")[0].strip().lower()
    return mime, _b64decode(data)


def _inline_bytes(value: str) -> bytes:
    return _data_url(value)[1] if value.startswith("data:") else _b64decode(value)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WebP or JPEG header; None if unreadable."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        b = data[21:25]
        width = 1 + (b[0] | (b[1] & 0x3F) << 8)
        height = 1 + (b[1] >> 6 | b[2] << 2 | (b[3] & 0x0F) << 10)
        return width, height
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None


def _wav_seconds(data: bytes) -> float | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    i = 12
    byte_rate = 0
    while i + 8 <= len(data):
        kind = data[i : i + 4]
        (size,) = struct.unpack("<I", data[i + 4 : i + 8])
        if kind == b"fmt " and i + 20 <= len(data):
            (byte_rate,) = struct.unpack("<I", data[i + 16 : i + 20])
        elif kind == b"data":
            held = min(size, len(data) - i - 8)  # a streamed WAV may claim more than it holds
            return held / byte_rate if byte_rate else None
        i += 8 + size + (size & 1)
    return None
