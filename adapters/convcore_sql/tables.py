"""The tables, as sqlmodel models, and their prefixed copies for one store.

The models are the one definition of every column. They live on a private
``MetaData`` under bare names; :func:`bind_tables` copies them into a fresh
``MetaData`` under ``<prefix><name>`` and adds the indexes, whose names carry
the prefix too (PostgreSQL index names are per schema, not per table).

Rows are keyed by ``conv_key``, the SHA-256 hex of conv_uid: any string up
to 1024 characters becomes a 64-character ASCII key that every dialect can
index (MySQL cannot index a long utf8mb4 VARCHAR). Turn ids are keyed the
same way. Timestamps are DOUBLE, so a float round-trips exactly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CHAR, JSON, BigInteger, Boolean, Double, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import Field, SQLModel

__all__ = ["MAX_KIND_LENGTH", "Tables", "bind_tables", "digest", "exact_collation"]

_PG_UNESCAPE = re.compile(r"\\([\\0])")


class SafeText(TypeDecorator[str]):
    """Text that round-trips any Python string on every dialect.

    MySQL's TEXT holds 64 KiB, so unbounded text is LONGTEXT there.
    PostgreSQL text cannot hold NUL, so on PostgreSQL backslash and NUL are
    stored escaped (``\\`` → ``\\\\``, NUL → ``\\0``); equality filters still
    work, since their parameters are escaped the same way.
    """

    impl = Text
    cache_ok = True

    def __init__(self, length: int | None = None, *, exact: bool = False) -> None:
        super().__init__()
        self.length = length
        self.exact = exact

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in {"mysql", "mariadb"}:
            if self.length and self.exact:
                return dialect.type_descriptor(
                    mysql.VARCHAR(self.length, charset="utf8mb4", collation=exact_collation(dialect))
                )
            return dialect.type_descriptor(String(self.length) if self.length else mysql.LONGTEXT())
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Text())  # escaping can make it longer
        return dialect.type_descriptor(String(self.length) if self.length else Text())

    def bind_processor(self, dialect: Dialect) -> Any:
        # Escaping is PostgreSQL's alone: elsewhere the impl's own processing
        # (none for text), rather than a call per value that returns it.
        if dialect.name != "postgresql":
            return self.impl_instance.bind_processor(dialect)
        return super().bind_processor(dialect)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        if dialect.name != "postgresql":
            return self.impl_instance.result_processor(dialect, coltype)
        return super().result_processor(dialect, coltype)

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None or dialect.name != "postgresql":
            return value
        return value.replace("\\", "\\\\").replace("\x00", "\\0")

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None or dialect.name != "postgresql" or "\\" not in value:
            return value
        return _PG_UNESCAPE.sub(lambda m: "\x00" if m.group(1) == "0" else "\\", value)


def exact_collation(dialect: Dialect) -> str:
    """MySQL/MariaDB: a collation under which equal means the same string.

    The server's default (``utf8mb4_general_ci`` and the like) ignores case,
    accents and trailing spaces, so a listing filtered by user_name "ann"
    would return the conversations of "ANN", "Ann" and "ann ". Binary and
    NO PAD: MariaDB's ``utf8mb4_nopad_bin``, MySQL 8.0.17+'s
    ``utf8mb4_0900_bin`` (older MySQL has only ``utf8mb4_bin``, which still
    ignores trailing spaces).
    """
    if dialect.name == "mariadb" or getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"
    version = getattr(dialect, "server_version_info", None) or ()
    return "utf8mb4_0900_bin" if tuple(version) >= (8, 0, 17) else "utf8mb4_bin"


LongText = SafeText()
Key = CHAR(64)
# Compared by listing filters: exact (binary) on MySQL/MariaDB too.
Name = SafeText(256, exact=True)  # convcore.schema.MAX_NAME_LENGTH


def digest(value: str) -> str:
    """The fixed-length key of an arbitrary string id."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


class _Base(SQLModel):
    # A private registry: the prefixed copies are what stores use, and the
    # app's own SQLModel.metadata stays free of convcore's tables.
    metadata = MetaData()


class ConversationRow(_Base, table=True):
    """One row per conversation; locked by every append to it."""

    __tablename__ = "conversations"

    conv_key: str = Field(sa_type=Key, primary_key=True)
    conv_uid: str = Field(sa_type=LongText)
    user_name: str | None = Field(default=None, sa_type=Name)
    sys_code: str | None = Field(default=None, sa_type=Name)
    chat_mode: str = Field(sa_type=LongText)
    chat_param: str | None = Field(default=None, sa_type=LongText)
    model: str | None = Field(default=None, sa_type=LongText)
    encoding: str = Field(sa_type=String(64))
    system: list[dict[str, Any]] = Field(sa_type=JSON)  # MessageDraft dumps
    created_at: float = Field(sa_type=Double)
    updated_at: float = Field(sa_type=Double)
    message_count: int = Field(sa_type=BigInteger)  # also the last seq
    total_tokens: int = Field(sa_type=BigInteger)


class MessageRow(_Base, table=True):
    """One row per logged message; (conv_key, seq) is the primary key."""

    __tablename__ = "messages"

    conv_key: str = Field(sa_type=Key, primary_key=True)
    seq: int = Field(sa_type=BigInteger, primary_key=True, sa_column_kwargs={"autoincrement": False})
    # Tokens of messages 1..seq-1: non-decreasing in seq, so the tail within
    # a budget is one index range (cum_before >= total - budget).
    cum_before: int = Field(sa_type=BigInteger)
    token_count: int = Field(sa_type=BigInteger)
    role: str = Field(sa_type=String(16))
    content: str = Field(sa_type=LongText)
    name: str | None = Field(default=None, sa_type=LongText)
    tool_call_id: str | None = Field(default=None, sa_type=LongText)
    # An assistant message's tool calls (ToolCall dumps); SQL NULL when it has none.
    tool_calls: list[dict[str, Any]] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    starts_round: bool = Field(sa_type=Boolean)
    # Image, audio and file content parts as sent (NULL for a text message).
    parts: list[dict[str, Any]] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    turn_id: str = Field(sa_type=LongText)
    created_at: float = Field(sa_type=Double)


class TurnRow(_Base, table=True):
    """The idempotency record of a turn and the seqs of its messages."""

    __tablename__ = "turns"

    conv_key: str = Field(sa_type=Key, primary_key=True)
    turn_key: str = Field(sa_type=Key, primary_key=True)
    turn_id: str = Field(sa_type=LongText)
    model: str | None = Field(default=None, sa_type=LongText)
    prompt_tokens: int = Field(sa_type=BigInteger)
    completion_tokens: int = Field(sa_type=BigInteger)
    finish_reason: str = Field(sa_type=String(16))
    created_at: float = Field(sa_type=Double)
    first_seq: int = Field(sa_type=BigInteger)
    last_seq: int = Field(sa_type=BigInteger)
    params: dict[str, Any] | None = Field(default=None, sa_type=JSON(none_as_null=True))


def _binary(length: int | None = None) -> Any:
    """Text ordered and compared by code point on every dialect (lists of
    records are ordered by key, as the memory store orders them)."""
    base = String(length) if length else Text()
    my = mysql.VARCHAR(length, collation="utf8mb4_bin") if length else mysql.TEXT(collation="utf8mb4_bin")
    return (
        base.with_variant(String(length, collation="C") if length else Text(collation="C"), "postgresql")
        .with_variant(my, "mysql")
        .with_variant(my, "mariadb")
    )


MAX_KIND_LENGTH = 255
# JSON with \u escapes only (json.dumps escapes NUL), so PostgreSQL text holds it as it is.
_JSON_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql").with_variant(mysql.LONGTEXT(), "mariadb")


class RecordRow(_Base, table=True):
    """One record of the chat modes (an app, a datasource, a knowledge space or
    document, a flow), keyed by (kind, SHA-256 of its key): keys of any
    length fit the primary key on every dialect. ``user_name`` / ``sys_code``
    copy the value's owner (NULL: nobody's) for the owner-filtered listing."""

    __tablename__ = "records"

    kind: str = Field(sa_type=_binary(MAX_KIND_LENGTH), primary_key=True)
    key_digest: str = Field(sa_type=String(64), primary_key=True)
    key: str = Field(sa_type=_binary())
    value: str = Field(sa_type=_JSON_TEXT)
    updated_at: float = Field(sa_type=Double)
    user_name: str | None = Field(default=None, sa_type=Name)
    sys_code: str | None = Field(default=None, sa_type=Name)


class SchemaVersionRow(_Base, table=True):
    """A single row (id 1) holding the schema version the tables are at."""

    __tablename__ = "schema_version"

    id: int = Field(sa_type=Integer, primary_key=True, sa_column_kwargs={"autoincrement": False})
    version: int = Field(sa_type=Integer)


@dataclass(frozen=True)
class Tables:
    """One store's tables, under its prefix."""

    metadata: MetaData
    conversations: Table
    messages: Table
    turns: Table
    schema_version: Table
    records: Table


def bind_tables(prefix: str) -> Tables:
    """Copies of the model tables named ``<prefix><name>``, with indexes."""
    md = MetaData()

    def copy(model: type[SQLModel]) -> Table:
        source: Table = model.__table__  # type: ignore[attr-defined]
        return source.to_metadata(md, name=f"{prefix}{source.name}")

    conv, msgs, turns, version, records = (
        copy(m) for m in (ConversationRow, MessageRow, TurnRow, SchemaVersionRow, RecordRow)
    )
    # Listing newest first per user / per sys_code / overall: an index range
    # read backwards, whatever the number of conversations or messages.
    Index(f"{prefix}ix_conv_user", conv.c.user_name, conv.c.updated_at, conv.c.conv_key)
    Index(f"{prefix}ix_conv_sys", conv.c.sys_code, conv.c.updated_at, conv.c.conv_key)
    Index(f"{prefix}ix_conv_updated", conv.c.updated_at, conv.c.conv_key)
    # The tail read: (conv_key, cum_before >= x) in seq order. seq is in the
    # key so ties (zero-token messages) come back in order from the index.
    Index(f"{prefix}ix_msg_tail", msgs.c.conv_key, msgs.c.cum_before, msgs.c.seq)
    # A user's (or a sys_code's) records of one kind, without reading the others'.
    Index(f"{prefix}ix_rec_user", records.c.kind, records.c.user_name)
    Index(f"{prefix}ix_rec_sys", records.c.kind, records.c.sys_code)
    return Tables(md, conv, msgs, turns, version, records)
