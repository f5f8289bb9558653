"""What a streamed turn looks like on the wire, in DB-GPT's dialect.

- Each chunk's ``id`` is the conversation's ``conv_uid``, as DB-GPT's
  API documentation says: DB-GPT's client drops unknown fields, so the id is the
  only place a streaming DB-GPT client can learn which conversation to
  continue. ``turn_id`` carries the turn's own id (a non-streaming
  answer's ``id``), so turns can still be told apart and audited.
- ``"incremental": false`` asks for the whole text so far in every chunk
  (DB-GPT's full-return mode) instead of the new piece.
- A failure after the stream has started is one event that is *not* a
  chunk: ``{"error": {...}, "success": false, "err_code", "err_msg",
  "text", "conv_uid"}``. The OpenAI SDK raises ``APIError`` on an event with
  ``error``; DB-GPT's client raises because the event is not a valid chunk
  (its message shows the event, error text included); DB-GPT's flow runner
  shows ``text``. Nobody mistakes it for a finished, empty answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from convcore import ChatCompletionChunk, ChatRequest, TurnStream

from .errors import error_body
from .openapi_doc import ErrorBody

__all__ = ["StreamErrorEvent", "StreamShape", "StreamedChunk", "chunk_json", "stream_error_event"]


class StreamedChunk(ChatCompletionChunk):
    """One chat.completion.chunk of a stream, in DB-GPT's dialect: ``id``
    is the conversation's conv_uid and ``turn_id`` the turn's own id; the
    last chunk carries ``finish_reason`` and ``usage``."""

    model_config = ConfigDict(title="ChatCompletionChunk")

    id: str = Field(description="The conversation's conv_uid, where DB-GPT's clients read it")
    turn_id: str = Field(description="The turn's own id: what a non-streaming answer's id is")


class StreamErrorEvent(ErrorBody):
    """A failure after the stream started: one event, the error body with
    its message again as ``text`` and the conversation's ``conv_uid``. It
    is not a chunk, so no client takes it for an empty answer."""

    model_config = ConfigDict(title="StreamErrorEvent")

    text: str = Field(description="The error message again, where DB-GPT's flow runner shows it")
    conv_uid: str


def chunk_json(chunk: ChatCompletionChunk) -> dict[str, Any]:
    """A chunk as sent: no ``usage`` key until there is usage (nor the other
    last-chunk fields), no null delta fields."""
    data = chunk.model_dump(mode="json")
    for key in ("usage", "conversation_created", "history_matched", "trim"):
        if data.get(key) is None:
            data.pop(key, None)
    for choice in data["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


class StreamShape:
    """Renders the chunks of one stream for the request that asked for it."""

    def __init__(self, request: ChatRequest) -> None:
        self.cumulative = request.incremental is False
        self._text = ""

    def chunk(self, chunk: ChatCompletionChunk) -> dict[str, Any]:
        data = chunk_json(chunk)
        data["id"] = chunk.conv_uid
        data["turn_id"] = chunk.id  # what a non-streaming answer's id is: the turn, for audits
        if self.cumulative:
            for choice in data["choices"]:
                self._text += choice["delta"].get("content") or ""
                choice["delta"]["content"] = self._text
        return data

    def error(self, stream: TurnStream, exc: BaseException) -> dict[str, Any]:
        return stream_error_event(stream.conv_uid, exc)


def stream_error_event(conv_uid: str, exc: BaseException) -> dict[str, Any]:
    body = error_body(exc)
    return {**body, "text": body["err_msg"], "conv_uid": conv_uid}
