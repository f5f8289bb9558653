"""chat_data's answer as DB-GPT's chart view (``enable_vis``).

DB-GPT's web UI renders ``<chart-view content="…" />``, whose ``content`` is
JSON (``type``, ``sql``, ``data``: a list of row objects), HTML-escaped so
the attribute stays one attribute. convcore always proposes a table view
(``response_table``); cells are kept as JSON numbers, booleans and nulls
where they are those, and as text otherwise (binary values as their size).
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from .dbaccess import QueryResult

__all__ = ["chart_view"]


def _value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    return str(value)  # the query runner already cut each cell to 4 KiB


def chart_view(sql: str, result: QueryResult) -> str:
    rows = [dict(zip(result.columns, (_value(v) for v in row), strict=False)) for row in result.rows]
    payload = {"type": "response_table", "sql": sql, "data": rows}
    content = json.dumps(payload, ensure_ascii=False, default=str, allow_nan=False)
    return f'<chart-view content="{html.escape(content, quote=True)}" />'
