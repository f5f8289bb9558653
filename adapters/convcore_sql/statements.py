"""The store's statements, built once per store with bound parameters.

Building a statement per call costs more Python than running it: every
call would construct the expression and walk it for SQLAlchemy's cache key.
Built once, each is compiled once per engine (SQLAlchemy's compiled cache)
and prepared once per connection (asyncpg's statement cache). Rows come
back positionally, in the column orders below.

The turn path, in statements (round trips add BEGIN/COMMIT where the
dialect needs them):

- ``context`` (read_context, read_tail): the conversation row, whether the
  turn id is stored, and (MySQL/MariaDB, SQLite) the tail, in one SELECT:
  the row joined to the ``ix_msg_tail`` range ``cum_before >= total_tokens
  - budget``. One statement reads one snapshot, so the tail cannot hold
  messages newer than the row. MySQL reads the row first as a constant,
  so its range optimizer sees the bound's value; SQLite has no statistics
  to be misled by.
- ``tail`` (PostgreSQL): there the bound must be a value the planner can
  see: joined to the row it is a parameter, estimated as a third of the
  conversation, and a long conversation's tail becomes a sequential scan.
  So PostgreSQL reads the tail in a second statement, bounded by values
  from ``context`` (``low``, and ``last`` to keep out messages appended
  since).
- ``head`` and ``tail`` (SQLite, read in the driver's thread): the join
  repeats the conversation's thirteen columns on every tail row, and
  sqlite3 builds each value as a Python object: two statements in one read
  transaction (one snapshot) cost half the thread's time of the join for a
  40-message tail.
- ``lock`` (append_turn): the conversation row, locked, and whether the
  turn id is stored.
- ``create``: the conversation row, when ``lock`` found none.
- the writes: on PostgreSQL one statement (``write_cte``: the messages and
  the turn record inserted in CTEs of the row's UPDATE); elsewhere
  ``insert_messages`` (one executemany), ``insert_turn``, ``update``.
- PostgreSQL, a turn of an existing conversation: ``append_one``, the
  whole append (lock, checks, seqs, inserts, update) in one statement run
  on its own, so one round trip instead of BEGIN, ``lock``, ``write_cte``
  and COMMIT. Its seqs and running totals are computed from the locked
  row, so nothing read before the lock is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Delete,
    Executable,
    Insert,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite

from .tables import Tables

__all__ = ["CONV_COLUMNS", "CTE_MESSAGES", "MSG_COLUMNS", "TURN_COLUMNS", "UPDATED_COLUMNS", "Statements"]

CTE_MESSAGES = 16  # PostgreSQL: turns of up to this many messages are written in one statement

# Positional row layouts.
CONV_COLUMNS = (
    "conv_uid",
    "user_name",
    "sys_code",
    "chat_mode",
    "chat_param",
    "model",
    "encoding",
    "system",
    "created_at",
    "updated_at",
    "message_count",
    "total_tokens",
)
MSG_COLUMNS = (
    "role",
    "content",
    "name",
    "tool_call_id",
    "token_count",
    "starts_round",
    "seq",
    "turn_id",
    "created_at",
    "parts",
    "tool_calls",
)
TURN_COLUMNS = ("model", "prompt_tokens", "completion_tokens", "finish_reason", "created_at", "params")
# What an append changes on an existing conversation (storekit.apply_turn).
UPDATED_COLUMNS = (
    "chat_mode",
    "chat_param",
    "model",
    "system",
    "updated_at",
    "message_count",
    "total_tokens",
)


def _param(name: str, table: Table, column: str) -> Any:
    return bindparam(name, type_=table.c[column].type)


def _typed(name: str, table: Table, column: str) -> Any:
    """A parameter cast to its column's type: in a SELECT list PostgreSQL
    cannot infer it from the column it is inserted into."""
    return cast(_param(name, table, column), table.c[column].type)


def _owner_may_append(cur: Any, conv: Table) -> ColumnElement[bool]:
    """``storekit.check_turn_owner`` in SQL, on ``cur``, a locked row of
    ``conv``: parameters ``owner_user`` and ``owner_sys`` (NULL: any) and
    ``owned_only`` (the row must then have a user_name)."""
    user = _typed("owner_user", conv, "user_name")
    sys_code = _typed("owner_sys", conv, "sys_code")
    owned = cast(bindparam("owned_only", type_=Boolean()), Boolean())
    return and_(
        or_(~owned, cur.c.user_name.is_not(None)),
        or_(user.is_(None), cur.c.user_name.is_(None), cur.c.user_name == user),
        or_(sys_code.is_(None), cur.c.sys_code.is_(None), cur.c.sys_code == sys_code),
    )


@dataclass
class Statements:
    """One store's statements. Parameters: ``key`` (conv_key), ``turn_key``,
    ``budget`` (max_tokens); ``w_key`` and ``c_<column>`` for ``update``."""

    tables: Tables
    backend: str
    context: Select[Any] = field(init=False)
    head: Select[Any] = field(init=False)
    tail: Select[Any] = field(init=False)
    conversation: Select[Any] = field(init=False)
    lock: Select[Any] = field(init=False)
    lock_plain: Select[Any] = field(init=False)
    batch_rows: Select[Any] = field(init=False)
    batch_turns: Select[Any] = field(init=False)
    create: Executable = field(init=False)
    insert_messages: Insert = field(init=False)
    insert_turn: Insert = field(init=False)
    update: Update = field(init=False)
    turn: Select[Any] = field(init=False)
    deletes: tuple[Delete, ...] = field(init=False)
    _ctes: dict[tuple[int, bool], Executable] = field(init=False, default_factory=dict)
    _appends: dict[tuple[int, bool, bool], Executable] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        t = self.tables
        conv, msgs, turns = t.conversations, t.messages, t.turns
        key = _param("key", conv, "conv_key")
        conv_cols = [conv.c[n] for n in CONV_COLUMNS]
        msg_cols = [msgs.c[n] for n in MSG_COLUMNS]
        # Uncorrelated, so evaluated once (PostgreSQL: an InitPlan).
        turn_seq = (
            select(turns.c.first_seq)
            .where(turns.c.conv_key == key, turns.c.turn_key == _param("turn_key", turns, "turn_key"))
            .scalar_subquery()
            .label("turn_seq")
        )
        tail_on: ColumnElement[bool] = and_(
            msgs.c.conv_key == key,
            msgs.c.cum_before >= conv.c.total_tokens - bindparam("budget", type_=msgs.c.cum_before.type),
        )
        self.head = select(*conv_cols, turn_seq).where(conv.c.conv_key == key)
        if self.joined_tail:
            self.context = (
                select(*conv_cols, turn_seq, *msg_cols)
                .select_from(conv.outerjoin(msgs, tail_on))
                .where(conv.c.conv_key == key)
            )
        else:
            self.context = self.head
        self.tail = (
            select(*msg_cols)
            .where(
                msgs.c.conv_key == key,
                msgs.c.cum_before >= bindparam("low", type_=msgs.c.cum_before.type),
                msgs.c.seq <= bindparam("last", type_=msgs.c.seq.type),
            )
            .order_by(msgs.c.cum_before, msgs.c.seq)
        )
        self.conversation = select(*conv_cols).where(conv.c.conv_key == key)
        self.lock = select(*conv_cols, turn_seq).where(conv.c.conv_key == key).with_for_update()
        self.lock_plain = select(conv.c.message_count).where(conv.c.conv_key == key).with_for_update()
        # SQLite group commit: a batch's conversations and stored turn ids in two reads.
        self.batch_rows = select(*conv_cols, conv.c.conv_key).where(
            conv.c.conv_key.in_(bindparam("keys", expanding=True))
        )
        self.batch_turns = select(turns.c.conv_key, turns.c.turn_key).where(
            turns.c.turn_key.in_(bindparam("turn_keys", expanding=True))
        )
        self.create = self._create_statement()
        self.insert_messages = insert(msgs)
        self.insert_turn = insert(turns)
        self.update = (
            update(conv)
            .where(conv.c.conv_key == _param("w_key", conv, "conv_key"))
            .values({n: _param(f"c_{n}", conv, n) for n in UPDATED_COLUMNS})
        )
        self.turn = (
            select(*[turns.c[n] for n in TURN_COLUMNS], *msg_cols)
            .join(
                msgs,
                and_(
                    msgs.c.conv_key == turns.c.conv_key,
                    msgs.c.seq >= turns.c.first_seq,
                    msgs.c.seq <= turns.c.last_seq,
                ),
            )
            .where(turns.c.conv_key == key, turns.c.turn_key == _param("turn_key", turns, "turn_key"))
            .order_by(msgs.c.seq)
        )
        self.deletes = tuple(
            delete(table).where(table.c.conv_key == _param("key", table, "conv_key"))
            for table in (msgs, turns, conv)
        )

    @property
    def joined_tail(self) -> bool:
        """Whether ``context`` brings the tail too (all but PostgreSQL)."""
        return self.backend != "postgresql"

    @property
    def created_rowcount(self) -> bool:
        """Whether ``create``'s rowcount says the row was inserted (1) or
        already there (0). MySQL reports 1 for both (SQLAlchemy connects
        with FOUND_ROWS), so there the row is read back."""
        return self.backend in {"postgresql", "sqlite"}

    def _create_statement(self) -> Executable:
        table = self.tables.conversations
        if self.backend == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing(index_elements=["conv_key"])
        if self.backend == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        if self.backend in {"mysql", "mariadb"}:
            stmt = mysql.insert(table)
            # A no-op update still takes the row lock, so creators queue.
            return stmt.on_duplicate_key_update(conv_key=stmt.inserted.conv_key)
        return insert(table)  # a duplicate key is retried

    def append_one(self, count: int, *, system: bool, model: bool) -> Executable | None:
        """PostgreSQL: a turn of ``count`` messages appended to an existing
        conversation in one statement, or None (other dialects, or past
        ``CTE_MESSAGES``). ``system``/``model``: whether the turn replaces
        the row's system prompt / model.

        ``cur`` locks the row (a waiting statement then sees the row as the
        lock holder left it); ``ok`` is that row when the turn id is not
        stored, ``expect`` (-1 for none) matches and the turn's owner may
        use the conversation (``storekit.check_turn_owner``); the inserts and the
        update read their seqs and totals from ``ok``, so they write
        nothing when it is empty. A turn id committed while this statement
        waited for the lock is not in its snapshot: the turn insert then
        fails on its primary key and the append is run again.

        One row, or none if the conversation does not exist: the locked
        row (CONV_COLUMNS), whether the turn id is stored, then the
        updated row (CONV_COLUMNS, NULLs when nothing was written).
        Parameters ``key``, ``turn_key``, ``expect``, ``owner_user``,
        ``owner_sys``, ``owned_only``, ``added``,
        ``m<i>_<column>`` and ``m<i>_off`` (tokens of the turn's earlier
        messages), ``t_<column>``, ``c_<column>``."""
        if self.backend != "postgresql" or count > CTE_MESSAGES:
            return None
        stmt = self._appends.get((count, system, model))
        if stmt is None:
            stmt = self._append_one(count, system, model)
            self._appends[(count, system, model)] = stmt
        return stmt

    def _append_one(self, count: int, system: bool, model: bool) -> Executable:
        t = self.tables
        conv, msgs, turns = t.conversations, t.messages, t.turns
        key = _param("key", conv, "conv_key")
        big = msgs.c.cum_before.type
        cur = select(*[conv.c[n] for n in CONV_COLUMNS], conv.c.conv_key).where(conv.c.conv_key == key)
        cur_cte = cur.with_for_update().cte("cur")
        stored = (
            select(turns.c.first_seq)
            .where(turns.c.conv_key == key, turns.c.turn_key == _param("turn_key", turns, "turn_key"))
            .exists()
        )
        expect = bindparam("expect", type_=big)
        ok = (
            select(cur_cte.c.conv_key, cur_cte.c.message_count, cur_cte.c.total_tokens)
            .where(
                or_(expect < 0, cur_cte.c.message_count == expect),
                ~stored,
                _owner_may_append(cur_cte, conv),
            )
            .cte("ok")
        )
        writes = []
        for i in range(count):
            names = [c.name for c in msgs.c if c.name not in {"seq", "cum_before"}]
            rows = select(
                *[_typed(f"m{i}_{n}", msgs, n) for n in names],
                ok.c.message_count + (i + 1),
                ok.c.total_tokens + bindparam(f"m{i}_off", type_=big),
            )
            writes.append(insert(msgs).from_select([*names, "seq", "cum_before"], rows).cte(f"m{i}"))
        names = [c.name for c in turns.c if c.name not in {"first_seq", "last_seq"}]
        rows = select(
            *[_typed(f"t_{n}", turns, n) for n in names], ok.c.message_count + 1, ok.c.message_count + count
        )
        writes.append(insert(turns).from_select([*names, "first_seq", "last_seq"], rows).cte("new_turn"))
        changed: dict[str, Any] = {
            "chat_mode": _param("c_chat_mode", conv, "chat_mode"),
            "chat_param": _param("c_chat_param", conv, "chat_param"),
            "updated_at": func.greatest(conv.c.updated_at, _param("c_updated_at", conv, "updated_at")),
            "message_count": ok.c.message_count + count,
            "total_tokens": ok.c.total_tokens + bindparam("added", type_=big),
        }
        if model:
            changed["model"] = _param("c_model", conv, "model")
        if system:
            changed["system"] = _param("c_system", conv, "system")
        updated = (
            update(conv)
            .where(conv.c.conv_key == ok.c.conv_key)
            .values(changed)
            .returning(*[conv.c[n] for n in CONV_COLUMNS])
            .cte("updated")
        )
        return (
            select(
                *[cur_cte.c[n] for n in CONV_COLUMNS],
                stored.label("stored"),
                *[updated.c[n] for n in CONV_COLUMNS],
            )
            .select_from(cur_cte.outerjoin(updated, true()))
            .add_cte(*writes)
        )

    def write_cte(self, count: int, *, created: bool = False) -> Executable | None:
        """PostgreSQL: ``count`` messages, the turn record and (unless the
        row was ``created`` by this append, with its final values) the
        row's update, in one statement. None elsewhere, or past
        ``CTE_MESSAGES`` messages (one shape per count is compiled and
        kept). Parameters ``m<i>_<column>``, ``t_<column>``, and those of
        ``update``."""
        if self.backend != "postgresql" or count > CTE_MESSAGES:
            return None
        stmt = self._ctes.get((count, created))
        if stmt is None:
            msgs, turns = self.tables.messages, self.tables.turns
            # One single-row INSERT per message: a multi-row VALUES is not
            # cacheable in SQLAlchemy, and would be compiled on every call.
            ctes = []
            for i in range(count):
                row = {c.name: _param(f"m{i}_{c.name}", msgs, c.name) for c in msgs.c}
                ctes.append(insert(msgs).values(row).cte(f"m{i}"))
            turn = insert(turns).values({c.name: _param(f"t_{c.name}", turns, c.name) for c in turns.c})
            stmt = turn.add_cte(*ctes) if created else self.update.add_cte(*ctes, turn.cte("new_turn"))
            self._ctes[(count, created)] = stmt
        return stmt
