"""Finding the SQL in a model's reply and deciding whether it may run.

A query runs only if every check passes (each alone would refuse most
writes; together they also refuse the tricks, such as ``WITH d AS (DELETE
…) SELECT``, a ``;`` hidden after a comment, or ``SELECT … INTO``):

1. one statement: no ``;`` outside strings and comments (one at the end is dropped);
2. it starts with SELECT or WITH;
3. no write, DDL, session or transaction keyword outside strings and comments;
4. no call by a quoted name (``"pg_sleep"(1)``), which no name check can read;
5. sqlglot parses it, in the datasource's dialect, into exactly one SELECT or
   set operation whose tree holds no DML/DDL/command node, and every
   function it calls is on an allow-list (:data:`ALLOWED_FUNCTIONS`, and per
   dialect :data:`ALLOWED_NAMES`): aggregates, window functions, string,
   number, date and JSON functions. Anything else (sleeping, locks, files,
   sequences, settings, backups, WAL messages, other connections, huge
   values) is refused because it is not on the list, not because someone
   thought to deny it;
6. for MySQL/MariaDB, a table named with a database names the datasource's
   own database (or ``information_schema``): one server holds many
   databases, and a query must not wander into another one.

The connection it then runs on is read-only where the dialect allows (see
:mod:`convcore_scenes.dbaccess`), so the checks are not the only wall.
"""

from __future__ import annotations

import re

from convcore.errors import MissingDependencyError

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ALLOWED_NAMES",
    "RefusedQuery",
    "check_query",
    "extract_sql",
    "function_allowed",
    "sqlglot_dialect",
]

MAX_QUERY_CHARS = 20_000

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)
_SQL_LANGS = {"sql", "sqlite", "postgresql", "postgres", "psql", "pgsql", "mysql", "mariadb", "plsql"}
_LOOKS_LIKE_SQL = re.compile(
    r"^\s*\(?\s*(SELECT|WITH|INSERT|UPDATE|DELETE|DROP|CREATE|ALTER|TRUNCATE|MERGE|REPLACE|PRAGMA"
    r"|ATTACH|GRANT|REVOKE|COPY|CALL|EXEC|SET|VALUES|TABLE)\b",
    re.I,
)
# Statement words; a single statement that starts with SELECT/WITH can only hold them
# in a data-modifying CTE or as a bare identifier (refused too: quote such names).
_DENIED_WORDS = (
    "INSERT UPDATE DELETE MERGE UPSERT DROP CREATE ALTER TRUNCATE RENAME GRANT REVOKE ATTACH DETACH "
    "PRAGMA VACUUM REINDEX ANALYZE COPY CALL EXEC EXECUTE DO SET RESET LOCK UNLOCK BEGIN COMMIT ROLLBACK "
    "SAVEPOINT INTO OUTFILE DUMPFILE NOTIFY LISTEN PREPARE DEALLOCATE SHUTDOWN KILL"
).split()
_DENIED = re.compile(r"\b(" + "|".join(_DENIED_WORDS) + r")\b", re.I)
_REPLACE_STATEMENT = re.compile(r"\bREPLACE\s+INTO\b", re.I)
# Functions sqlglot knows by name, by its class: read-only and bounded in what they build.
ALLOWED_FUNCTIONS = frozenset(
    (
        # aggregates
        "Count Sum Avg Min Max GroupConcat ArrayAgg Stddev StddevPop StddevSamp Variance VariancePop "
        "LogicalAnd LogicalOr PercentileCont PercentileDisc Median ApproxDistinct AnyValue CountIf Corr "
        "CovarPop CovarSamp BitwiseAndAgg BitwiseOrAgg "
        # window
        "RowNumber Rank DenseRank PercentRank CumeDist Ntile Lag Lead FirstValue LastValue NthValue "
        # conditionals and casts
        "Case If Coalesce Nullif Greatest Least Cast TryCast Exists "
        # strings
        "Lower Upper Length Substring Trim Concat ConcatWs Replace Left Right StrPosition SplitPart Pad "
        "Initcap Reverse RegexpLike RegexpReplace RegexpExtract Chr Ascii Unicode MD5 Typeof "
        # numbers
        "Round Abs Ceil Floor Pow Sqrt Ln Log Exp Sign Trunc ToNumber SafeDivide "
        # dates and times
        "Extract TimestampTrunc DateTrunc CurrentDate CurrentTimestamp CurrentTime TimeToStr StrToDate "
        "StrToTime Date DateAdd DateSub DateDiff TimestampDiff TimestampAdd TimestampSub Year Month Day "
        "Quarter Week DayOfWeek DayOfMonth DayOfYear UnixToTime TimeToUnix TsOrDsToDate TsOrDsToTimestamp "
        "TsOrDsAdd ToChar "
        # JSON and arrays
        "JSONExtract JSONExtractScalar JSONBExtract JSONBExtractScalar JSONFormat ArraySize ArrayContains "
        "Array Unnest Explode"
    ).split()
)
# Functions sqlglot does not know (left as ``Anonymous``), by their lowercase name, per dialect.
ALLOWED_NAMES = {
    "postgres": frozenset(
        "age date_part to_char to_timestamp every char_length octet_length btrim ltrim rtrim strpos "
        "translate repeat lpad rpad format string_agg bool_and bool_or jsonb_array_length "
        "json_array_length jsonb_typeof json_typeof mod div trunc width_bucket isfinite justify_days "
        "justify_hours make_date make_timestamp date_bin".split()
    ),
    "mysql": frozenset(
        "now curdate curtime sysdate unix_timestamp ifnull date_format time_format dayname monthname "
        "weekday yearweek last_day makedate char_length locate instr lpad rpad ltrim rtrim repeat "
        "format truncate mod field elt json_unquote json_length json_keys json_contains "
        "timestamp".split()
    ),
    "sqlite": frozenset(
        "datetime julianday time unixepoch strftime printf format total ifnull iif instr ltrim rtrim "
        "char unicode hex quote likelihood json_extract json_array_length json_type "
        "mod".split()
    ),
}
# Where the MySQL dialect's tables may live besides the datasource's own database.
_MYSQL_SHARED_SCHEMAS = frozenset({"information_schema"})
# Where _code_only left a quoted name or string: one followed by "(" is a call
# by a quoted name ("pg_sleep"(1), U&"\0070g_sleep"(1)), which the name checks cannot read.
_QUOTED = "\x00"


def function_allowed(node: object, dialect: str) -> bool:
    """Whether a sqlglot function node is on the allow-list for ``dialect``."""
    from sqlglot import exp

    if isinstance(node, exp.Anonymous):
        return str(node.name).lower() in ALLOWED_NAMES.get(dialect, frozenset())
    return type(node).__name__ in ALLOWED_FUNCTIONS


class RefusedQuery(Exception):
    """The query may not run; the message says why, for the user."""


def extract_sql(reply: str) -> str | None:
    """The first SQL code block of ``reply``: one fenced as ``sql`` (or a
    dialect), else an unlabelled one that starts like SQL. None if none."""
    fallback: str | None = None
    for match in _FENCE.finditer(reply):
        lang, body = match.group(1).lower(), match.group(2).strip()
        if not body:
            continue
        if lang in _SQL_LANGS:
            return body
        if not lang and fallback is None and _LOOKS_LIKE_SQL.match(body):
            fallback = body
    return fallback


def sqlglot_dialect(db_type: str) -> str:
    kind = db_type.lower()
    if kind in {"postgresql", "postgres"}:
        return "postgres"
    if kind in {"mysql", "mariadb"}:
        return "mysql"
    return "sqlite"


def _code_only(sql: str, dialect: str) -> str:
    """``sql`` with comments removed and every string literal and quoted
    identifier replaced by a placeholder, so the lexical checks see only code.
    Quoting follows ``dialect`` (a sqlglot name): ``#`` comments, backticks and
    backslash escapes are MySQL's, brackets SQLite's, dollar quotes and
    ``E'…'`` escapes PostgreSQL's. Where the server would read *more* code than
    this (MySQL's ``/*! … */``, ``--`` without a space), it errs towards code or refuses."""
    mysql, sqlite, postgres = dialect == "mysql", dialect == "sqlite", dialect == "postgres"
    quotes = "'\"" + ("`" if mysql or sqlite else "") + ("[" if sqlite else "")
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i) and not (mysql and i + 2 < n and not sql[i + 2].isspace()):
            # MySQL reads "--" as a comment only before whitespace: "1--1" is 1 - -1.
            end = sql.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        elif mysql and c == "#":
            end = sql.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        elif sql.startswith("/*", i):
            if mysql and (sql.startswith("/*!", i) or sql.startswith("/*M!", i)):
                raise RefusedQuery("it holds a MySQL executable comment (/*! … */)")
            end = sql.find("*/", i + 2)
            if end < 0:
                raise RefusedQuery("it has an unterminated /* comment")
            i = end + 2
            out.append(" ")
        elif c in quotes:
            close = "]" if c == "[" else c
            # Backslash escapes: MySQL's strings, and PostgreSQL's E'…' strings.
            backslash = (mysql and close in "'\"") or (postgres and close == "'" and _e_string(sql, i))
            j = i + 1
            while True:
                j = sql.find(close, j)
                if j < 0:
                    raise RefusedQuery("it has an unterminated quoted string or name")
                if close != "]" and sql.startswith(close * 2, j):
                    j += 2  # a doubled quote inside the literal
                    continue
                if backslash and _escaped(sql, j):
                    j += 1  # a backslash-escaped quote
                    continue
                break
            i = j + 1
            out.append(f" {_QUOTED} ")
        elif (
            postgres
            and c == "$"
            and not (i and (sql[i - 1].isalnum() or sql[i - 1] in "_$"))  # a$b$ is one identifier
            and (m := re.match(r"\$([A-Za-z_]\w*)?\$", sql[i:]))
        ):
            tag = m.group(0)
            end = sql.find(tag, i + len(tag))
            if end < 0:
                raise RefusedQuery("it has an unterminated dollar-quoted string")
            i = end + len(tag)
            out.append(f" {_QUOTED} ")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _e_string(sql: str, i: int) -> bool:
    """Whether the quote at ``i`` opens a PostgreSQL ``E'…'`` string."""
    return i > 0 and sql[i - 1] in "eE" and not (i > 1 and (sql[i - 2].isalnum() or sql[i - 2] in "_$"))


def _escaped(sql: str, j: int) -> bool:
    """Whether the character at ``j`` follows an odd number of backslashes."""
    k = j
    while k > 0 and sql[k - 1] == "\\":
        k -= 1
    return (j - k) % 2 == 1


def check_query(sql: str, db_type: str, database: str | None = None) -> str:
    """The statement to run (``sql`` without a trailing ``;``), or
    RefusedQuery saying why it may not run. ``database``: the datasource's
    own database, the only one a MySQL/MariaDB query may name."""
    text = sql.strip()
    if len(text) > MAX_QUERY_CHARS:
        raise RefusedQuery(f"it is longer than {MAX_QUERY_CHARS} characters")
    if _QUOTED in text:
        raise RefusedQuery("it holds a NUL character")
    code = _code_only(text, sqlglot_dialect(db_type)).strip()
    while code.endswith(";"):
        code = code[:-1].rstrip()
        text = text[: text.rstrip().rfind(";")].rstrip()
    if not code:
        raise RefusedQuery("it is empty")
    if ";" in code:
        raise RefusedQuery("it holds more than one statement")
    if not re.match(r"^\(*\s*(SELECT|WITH)\b", code, re.I):
        word = (code.split() or ["?"])[0].upper()
        raise RefusedQuery(f"it is not a SELECT but {word}")
    if m := _DENIED.search(code) or _REPLACE_STATEMENT.search(code):
        raise RefusedQuery(f"it uses {m.group(0).upper()}, which can change data or the session")
    if re.search(_QUOTED + r"\s*\(", code):
        raise RefusedQuery("it calls a function by a quoted name")
    _check_tree(text, db_type, database)
    return text


def _check_tree(sql: str, db_type: str, database: str | None) -> None:
    try:
        import sqlglot
        from sqlglot import exp
    except ImportError as exc:  # pragma: no cover - the scenes extra installs it
        raise MissingDependencyError("chat_data's SQL check", "scenes") from exc
    try:
        parsed = [e for e in sqlglot.parse(sql, read=sqlglot_dialect(db_type)) if e is not None]
    except sqlglot.errors.SqlglotError as exc:
        raise RefusedQuery(f"it could not be parsed as one SELECT ({type(exc).__name__})") from None
    if len(parsed) != 1:
        raise RefusedQuery("it holds more than one statement")
    root = parsed[0]
    if not isinstance(root, exp.Select | exp.SetOperation | exp.Subquery):
        raise RefusedQuery(f"it is not a SELECT but {type(root).__name__.upper()}")
    denied = tuple(
        getattr(exp, name)
        for name in (
            "DML Insert Update Delete Merge DDL Create Drop Alter TruncateTable Command Pragma Set Use "
            "Transaction Commit Rollback Copy Into Lock Attach Detach Grant Revoke Analyze LoadData Kill "
            "Cache Uncache Refresh Export"
        ).split()
        if hasattr(exp, name)
    )
    dialect = sqlglot_dialect(db_type)
    for node in root.walk():
        if isinstance(node, denied):
            raise RefusedQuery(f"it contains a {type(node).__name__.upper()} clause")
        if isinstance(node, exp.Func) and not function_allowed(node, dialect):
            name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
            raise RefusedQuery(
                f"it calls {name.lower()}(), which is not among the functions chat_data may call"
            )
        if dialect == "mysql" and isinstance(node, exp.Table) and node.db:
            schema = node.db.lower()
            if node.catalog or (schema != (database or "").lower() and schema not in _MYSQL_SHARED_SCHEMAS):
                raise RefusedQuery(
                    f"it reads from database {node.db!r}; only this datasource's own may be read"
                )
