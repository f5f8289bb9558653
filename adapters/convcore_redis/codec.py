"""How conversations, messages and turns are written to and read from Redis.

Messages and turn records are pydantic JSON; the seq of a message is put in
front of its JSON by the append script, which is the one that knows it.
Conversation metadata is a hash, so the script can update counters and
timestamps without parsing JSON: fields fixed at creation sit in one JSON
field, the rest in their own fields (floats as ``repr``, exact both ways).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter

from convcore.models import Conversation, Message, TurnRecord, TurnWrite, trusted_copy

__all__ = [
    "META_FIELDS",
    "as_str",
    "decode_conversation",
    "decode_messages",
    "decode_meta",
    "decode_turn",
    "encode_turn",
    "pairs_to_dict",
]

_STATIC = {"conv_uid", "user_name", "sys_code", "encoding", "created_at"}


def as_str(value: Any) -> str:
    """A reply value as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs_to_dict(reply: Any) -> dict[str, str]:
    """HGETALL's reply (a dict, or a flat list from a script) as str -> str."""
    if isinstance(reply, Mapping):
        return {as_str(k): as_str(v) for k, v in reply.items()}
    items = [v.decode() if type(v) is bytes else str(v) for v in reply]  # as_str, inlined: 26 a hash
    return dict(zip(items[::2], items[1::2], strict=True))


def encode_turn(turn: TurnWrite) -> tuple[list[str], list[str]]:
    """(per-message args, turn-level args) for the append script: the
    conversation's static JSON, model, chat_param, system, the record."""
    # Each message's JSON is its draft's plus the turn's fields; the script
    # writes '{"seq":N,' in front (it is the one that knows N).
    stamp = f',"turn_id":{_ascii(turn.turn_id)},"created_at":{turn.created_at!r}}}'
    messages: list[str] = []
    for draft in turn.messages:
        messages += [str(draft.token_count), draft.model_dump_json()[1:-1] + stamp]
    # Written out rather than json.dumps'd: a dozen small values a turn, each
    # through json.dumps's Python layers, cost more than the rest of the encoding.
    # Same bytes as json.dumps of the dict.
    static = (
        f'{{"conv_uid": {_ascii(turn.conv_uid)}, "user_name": {_ascii_or_null(turn.user_name)}, '
        f'"sys_code": {_ascii_or_null(turn.sys_code)}, "encoding": {_ascii(turn.encoding)}, '
        f'"created_at": {_float(turn.created_at)}}}'
    )
    system = (
        ""
        if turn.system is None
        else json.dumps([d.model_dump(mode="json") for d in turn.system], ensure_ascii=False)
    )
    # The turn record as TurnRecord.model_dump_json(exclude={"messages"}) writes it
    # (text unescaped, so a lone surrogate still fails before anything is sent).
    params = "null" if turn.params is None else _PARAMS.dump_json(turn.params).decode()
    record = (
        f'{{"conv_uid":{_text(turn.conv_uid)},"turn_id":{_text(turn.turn_id)},'
        f'"model":{_text_or_null(turn.model)},"prompt_tokens":{turn.prompt_tokens},'
        f'"completion_tokens":{turn.completion_tokens},"finish_reason":{_text(turn.finish_reason)},'
        f'"created_at":{_float(turn.created_at)},"params":{params}}}'
    )
    return messages, [
        static,
        _ascii_or_null(turn.chat_param),
        _ascii_or_null(turn.model),
        system,
        record,
    ]


# What json.dumps gives a str, without its Python layers (C functions of the json module).
_ascii = json.encoder.encode_basestring_ascii
_text = json.encoder.encode_basestring
_PARAMS: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def _ascii_or_null(value: str | None) -> str:
    return "null" if value is None else _ascii(value)


def _text_or_null(value: str | None) -> str:
    return "null" if value is None else _text(value)


def _float(value: float) -> str:
    """As json.dumps writes it."""
    return repr(value) if math.isfinite(value) else json.dumps(value)


# The metadata fields the scripts return, in this order (HMGET, not HGETALL:
# no field names on the wire, no dict to build).
META_FIELDS = ("conv", "chat_mode", "chat_param", "model", "system", "updated_at", "count", "tokens")


def decode_conversation(meta: Mapping[str, str]) -> Conversation:
    """The conversation in a metadata hash (see :func:`decode_meta`)."""
    return decode_meta([meta[f] for f in META_FIELDS])


def decode_meta(values: Sequence[Any]) -> Conversation:
    """The conversation in its metadata fields, in :data:`META_FIELDS` order,
    as str or as the bytes a script returned. What changes every turn (the
    counters, updated_at) is read each time; the rest is decoded once per
    distinct value and copied from then on."""
    static = (values[0], values[1], values[2], values[3], values[4])
    template = _TEMPLATES.get(static)
    if template is None:
        template = _decode_static(static)
        if len(_TEMPLATES) >= _TEMPLATE_LIMIT:
            del _TEMPLATES[next(iter(_TEMPLATES))]
        _TEMPLATES[static] = template
    # float() and int() read bytes as well as str; the template was validated.
    return trusted_copy(
        template,
        Conversation,
        updated_at=float(values[5]),
        message_count=int(values[6]),
        total_tokens=int(values[7]),
    )


_TEMPLATE_LIMIT = 4096
_TEMPLATES: dict[tuple[Any, ...], Conversation] = {}


def _decode_static(static: tuple[Any, ...]) -> Conversation:
    conv, chat_mode, chat_param, model, system = static
    fixed = {k: v for k, v in json.loads(conv).items() if k in _STATIC}
    return Conversation.model_validate(
        {
            **fixed,
            "chat_mode": as_str(chat_mode),
            "chat_param": json.loads(chat_param),
            "model": json.loads(model),
            "system": json.loads(system),
            "updated_at": fixed["created_at"],
        }
    )


_MESSAGES = TypeAdapter(list[Message])


class MessageCache:
    """Decoded messages by their exact stored bytes.

    A stored message never changes, and every turn reads the same window
    again, so most of a tail was decoded on the previous turn. Keyed by the
    bytes themselves, an entry can never be stale; the oldest entries go
    first once ``capacity`` entries or ``max_bytes`` of stored text are held
    (a message larger than a quarter of ``max_bytes`` is not kept; a
    ``capacity`` of 0 turns the cache off).
    """

    def __init__(self, capacity: int = 16_384, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._entries: dict[bytes, Message] = {}
        self._bytes = 0

    def decode(self, values: Sequence[Any]) -> list[Message]:
        # Messages are truthy and a missing one (None) is never a key: a
        # window read again is one C-level pass.
        out: list[Any] = list(map(self._entries.get, values))
        if all(out):
            return out
        if any(v is None for v in values):
            raise ValueError("a message of the conversation is missing")
        # A client that decodes replies gives str: the keys are their bytes.
        parts = [v if isinstance(v, bytes) else str(v).encode() for v in values]
        out = [self._entries.get(p) for p in parts]
        misses = [i for i, m in enumerate(out) if m is None]
        if misses:
            # All misses in one JSON parse (a first window can be thousands).
            fresh = _MESSAGES.validate_json(b"[" + b",".join(parts[i] for i in misses) + b"]")
            for i, message in zip(misses, fresh, strict=True):
                out[i] = message
                self.keep(parts[i], message)
        return out

    def keep(self, key: bytes, message: Message) -> None:
        """Hold ``message`` as what ``key`` decodes to: the store puts the
        messages it has just written here, so the next read finds them."""
        # A message's memory is a few times its text: count the text.
        if self.capacity and len(key) * 4 <= self.max_bytes and key not in self._entries:
            self._entries[key] = message
            self._bytes += len(key)
            while len(self._entries) > self.capacity or self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._bytes -= len(oldest)
                del self._entries[oldest]


_UNCACHED = MessageCache(capacity=0)


def decode_messages(values: Sequence[Any], cache: MessageCache = _UNCACHED) -> list[Message]:
    """A reply's messages, decoded (or taken from ``cache``)."""
    return cache.decode(values)


def decode_turn(record: Any, messages: Sequence[Any]) -> TurnRecord:
    _first, _count, body = as_str(record).split(" ", 2)
    return TurnRecord.model_validate({**json.loads(body), "messages": decode_messages(messages)})
