"""chat_data: talk to a database. chat_param is a datasource's db_name.

``prepare`` inspects the schema into one context block per table (the
tables the question names first, so the ones that matter survive the
budget) and asks the model for one SELECT in a ```sql block. ``finish``
checks that query (:mod:`convcore_scenes.sqlsafe`), runs it read-only
(:mod:`convcore_scenes.dbaccess`) and appends the result as a markdown
table (DB-GPT's ``<chart-view>`` when the request sets ``enable_vis``), or a
note saying why it was refused or failed. Nothing the model
writes can change the database.
"""

from __future__ import annotations

import logging
from typing import Any

from convcore.errors import BackendUnavailableError, InvalidRequestError
from convcore.scenes import ScenePlan, SceneRequest

from .chart_view import chart_view
from .datasources import Datasource, DatasourceRegistry
from .dbaccess import QueryResult, inspect_schema, run_readonly
from .sqlsafe import RefusedQuery, check_query, extract_sql

__all__ = ["DataScene", "markdown_table"]

log = logging.getLogger("convcore_scenes")

_DIALECTS = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mysql": "MySQL", "mariadb": "MariaDB"}
MAX_CELL_CHARS = 200


def _describe(exc: BaseException) -> str:
    """A one-line reason without URLs or SQLAlchemy's background links."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {text}"[:500] if text else type(orig).__name__


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    text = str(value).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def markdown_table(result: QueryResult) -> str:
    """The rows as a markdown table, with a line saying how many."""
    if not result.columns:
        return "_(the query returned no columns)_"
    lines = [
        "| " + " | ".join(_cell(c) for c in result.columns) + " |",
        "| " + " | ".join("---" for _ in result.columns) + " |",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in result.rows]
    n = len(result.rows)
    note = f"_(first {n} rows shown)_" if result.truncated else f"_({n} row{'s' if n != 1 else ''})_"
    return "\n".join([*lines, "", note])


class DataScene:
    """``chat_data``: schema in, one checked read-only SELECT out, its rows appended."""

    name = "chat_data"
    needs_param = True

    def __init__(
        self,
        datasources: DatasourceRegistry,
        *,
        max_rows: int = 100,
        query_timeout: float = 10.0,
        max_tables: int = 200,
        max_context_share: float = 0.6,
    ) -> None:
        self.datasources = datasources
        self.max_rows = max_rows
        self.query_timeout = query_timeout
        self.max_tables = max_tables
        self.max_context_share = max_context_share

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        name = (request.param or "").strip()
        ds = await self.datasources.by_name(name, caller=request.caller)
        if ds is None:
            raise InvalidRequestError(f"no datasource with db_name {name!r}", field="chat_param")
        ds = await self.datasources.connectable(ds)
        try:
            tables = await inspect_schema(ds, question=request.question, max_tables=self.max_tables)
        except Exception as exc:
            log.warning("chat_data: cannot inspect datasource %r: %s", ds.db_name, _describe(exc))
            raise BackendUnavailableError(
                f"datasource {ds.db_name!r} cannot be inspected: {_describe(exc)}"
            ) from None
        return ScenePlan(
            system_prompt=self._system_prompt(ds, len(tables)),
            context=tuple(t.ddl() for t in tables),
            max_context_share=self.max_context_share,
            state=ds,
            whole_addition=bool(request.request.enable_vis),  # a chart cut short is no chart
        )

    def _system_prompt(self, ds: Datasource, n_tables: int) -> str:
        dialect = _DIALECTS.get(ds.db_type, ds.db_type)
        about = f" ({ds.comment.strip()})" if ds.comment.strip() else ""
        tables = (
            "Its tables follow as CREATE TABLE statements (the most relevant first; some may be left out)."
            if n_tables
            else "It has no tables."
        )
        return (
            f'You answer questions about the {dialect} database "{ds.db_name}"{about}. {tables}\n'
            f"Answer with exactly one read-only {dialect} SELECT query in a ```sql code block, then one "
            f"sentence saying what it returns. The query is run for the user and up to {self.max_rows} "
            "rows of its result are shown after your answer. Only a single SELECT is ever run: never "
            "write INSERT, UPDATE, DELETE, DDL or several statements."
        )

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        ds = plan.state
        if not isinstance(ds, Datasource):
            return reply
        sql = extract_sql(reply)
        if sql is None:
            return reply
        try:
            statement = check_query(sql, ds.db_type, ds.db_name)
        except RefusedQuery as exc:
            return (
                f"{reply}\n\n**Query refused:** {exc}. Only one read-only SELECT statement is run; "
                "nothing was executed."
            )
        try:
            ds = await self.datasources.connectable(ds)  # again: the query may come long after prepare
        except InvalidRequestError as exc:
            return f"{reply}\n\n**Query refused:** {exc}. Nothing was executed."
        try:
            result = await run_readonly(ds, statement, max_rows=self.max_rows, timeout=self.query_timeout)
        except TimeoutError:
            return f"{reply}\n\n**Query stopped:** it ran longer than {self.query_timeout:g} s."
        except Exception as exc:
            reason = _describe(exc)
            if "interrupted" in reason.lower() or "statement timeout" in reason.lower():
                return f"{reply}\n\n**Query stopped:** it ran longer than {self.query_timeout:g} s."
            return f"{reply}\n\n**Query failed:** {reason}"
        if request.request.enable_vis:
            return f"{reply}\n\n{chart_view(statement, result)}"
        return f"{reply}\n\n{markdown_table(result)}"
