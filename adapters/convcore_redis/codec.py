"""How conversations, messages and turns are written to and read from Redis.

Messages and turn records are pydantic JSON; the seq of a message is put in
front of its JSON by the append script, which is the one that knows it.
Conversation metadata is a hash, so the script can update counters and
timestamps without parsing JSON: fields fixed at creation sit in one JSON
field, the rest in their own fields (floats as ``repr``, exact both ways).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter

from convcore.models import Conversation, Message, TurnRecord, TurnWrite
from convcore.storekit import turn_record

__all__ = [
    "as_str",
    "decode_conversation",
    "decode_messages",
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
    items = [as_str(v) for v in reply]
    return dict(zip(items[::2], items[1::2], strict=True))


def encode_turn(turn: TurnWrite) -> tuple[list[str], list[str]]:
    """(per-message args, turn-level args) for the append script: the
    conversation's static JSON, model, chat_param, system, the record."""
    # Each message's JSON is its draft's plus the turn's fields; the script
    # writes '{"seq":N,' in front (it is the one that knows N).
    stamp = f',"turn_id":{json.dumps(turn.turn_id)},"created_at":{turn.created_at!r}}}'
    messages: list[str] = []
    for draft in turn.messages:
        messages += [str(draft.token_count), draft.model_dump_json()[1:-1] + stamp]
    static = json.dumps(
        {
            "conv_uid": turn.conv_uid,
            "user_name": turn.user_name,
            "sys_code": turn.sys_code,
            "encoding": turn.encoding,
            "created_at": turn.created_at,
        }
    )
    system = (
        ""
        if turn.system is None
        else json.dumps([d.model_dump(mode="json") for d in turn.system], ensure_ascii=False)
    )
    record = turn_record(turn, ()).model_dump_json(exclude={"messages"})
    return messages, [static, json.dumps(turn.chat_param), json.dumps(turn.model), system, record]


def decode_conversation(meta: Mapping[str, str]) -> Conversation:
    static = {k: v for k, v in json.loads(meta["conv"]).items() if k in _STATIC}
    return Conversation.model_validate(
        {
            **static,
            "chat_mode": meta["chat_mode"],
            "chat_param": json.loads(meta["chat_param"]),
            "model": json.loads(meta["model"]),
            "system": json.loads(meta["system"]),
            "updated_at": float(meta["updated_at"]),
            "message_count": int(meta["count"]),
            "total_tokens": int(meta["tokens"]),
        }
    )


_MESSAGES = TypeAdapter(list[Message])


def decode_messages(values: Sequence[Any]) -> list[Message]:
    """All of a reply's messages in one JSON parse (a window can be thousands)."""
    if any(v is None for v in values):
        raise ValueError("a message of the conversation is missing")
    if not values:
        return []
    parts = [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return _MESSAGES.validate_json(b"[" + b",".join(parts) + b"]")


def decode_turn(record: Any, messages: Sequence[Any]) -> TurnRecord:
    _first, _count, body = as_str(record).split(" ", 2)
    return TurnRecord.model_validate({**json.loads(body), "messages": decode_messages(messages)})
