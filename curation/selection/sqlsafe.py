"""SQL that cannot touch the machine: quoting, policy predicates checked at load, a sandbox.

Policies come from YAML files that many people edit, and a ``sql`` rule's ``keep_where`` is
a DuckDB expression pasted into the selection query. Two fences keep it an expression over
the scores and nothing else:

- :func:`check_predicate` (at load): the text must be ONE expression. Comments and ``;`` are
  refused, parentheses must balance and never close more than they opened (so the text
  cannot step outside the parentheses it is wrapped in), and DuckDB's own parser must read
  ``SELECT * FROM scores WHERE (<text>)`` as one plain SELECT whose condition holds no
  subquery (so no ``read_text(...)``, no other table).
- :func:`sandbox` (at run): selection runs on a DuckDB connection of its own that first copies
  only the score columns the policy needs into a table (out of core: past ``memory_limit``
  DuckDB spills to its temp directory), then has external access disabled (no files but the
  one result file it writes, no network, no extensions) and its configuration locked, so
  nothing can turn it back on. ``curate explore`` locks its one connection the same way once
  its views exist, reading only the store's score files and the decision files in place (no
  copy per query): its query box runs on that connection.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

# nothing a policy query needs: no file system, no network, no extension loading
SANDBOX_CONFIG = {"enable_external_access": False, "autoinstall_known_extensions": False,
                  "autoload_known_extensions": False, "allow_community_extensions": False}


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _parse(sql: str) -> dict[str, Any]:
    """DuckDB's parse tree of ``sql`` as JSON (parsed only: nothing is bound or run)."""
    with duckdb.connect(config=SANDBOX_CONFIG) as con:
        return json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])


def _check_tokens(expr: str) -> None:
    try:
        tokens = duckdb.tokenize(expr)
    except Exception as e:  # noqa: BLE001 - the tokenizer's message says what it could not read
        raise ValueError(f"not an SQL expression: {e}") from None
    depth = 0
    for i, (pos, kind) in enumerate(tokens):
        if kind == duckdb.token_type.comment:
            raise ValueError("comments are not allowed in an expression")
        if kind != duckdb.token_type.operator:
            continue
        text = expr[pos: tokens[i + 1][0] if i + 1 < len(tokens) else len(expr)]
        for ch in text:
            if ch == ";":
                raise ValueError("';' ends a statement: give one expression, not statements")
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                raise ValueError(f"unbalanced parentheses: the ')' at character {pos + 1} closes nothing")
    if depth:
        raise ValueError(f"unbalanced parentheses: {depth} '(' left open")


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def check_predicate(expr: str) -> set[str] | None:
    """Check that ``expr`` is one SQL expression with no subquery; ValueError says why not.

    Returns the names it may read as columns (a superset: qualified names give every part,
    lambda parameters are included), or None when it selects columns by pattern
    (``COLUMNS(...)``, ``*``) and so may read any of them.
    """
    if not expr.strip():
        raise ValueError("empty expression")
    _check_tokens(expr)
    tree = _parse(f"SELECT * FROM scores WHERE ({expr})")
    if tree.get("error"):
        raise ValueError(f"not an SQL expression: {tree.get('error_message', 'does not parse')}")
    statements = tree.get("statements") or []
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    if node.get("type") != "SELECT_NODE" or (node.get("cte_map") or {}).get("map") or node.get("modifiers"):
        raise ValueError("not one expression")
    columns: set[str] | None = set()
    for n in _walk(node.get("where_clause")):
        if n.get("class") == "SUBQUERY" or n.get("type") in ("SELECT_NODE", "SET_OPERATION_NODE"):
            raise ValueError("subqueries are not allowed: an expression may read only the row's score columns")
        if n.get("class") == "STAR":
            columns = None
        elif n.get("class") == "COLUMN_REF" and columns is not None:
            columns.update(n.get("column_names") or [])
    return columns


def engine(settings: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory connection that can load no extension; ``settings`` (``memory_limit``,
    ``temp_directory``, ``threads``) bound its memory: past the limit DuckDB spills its tables to
    the temp directory. Files stay reachable until :func:`sandbox` locks it."""
    config = {k: v for k, v in SANDBOX_CONFIG.items() if k != "enable_external_access"}
    con = duckdb.connect(":memory:", config={**config, **(settings or {})})
    con.execute("SET enable_progress_bar = false")
    return con


def sandbox(con: duckdb.DuckDBPyConnection, allowed_paths: list[str] = (),
            directories: list[str] = ()) -> duckdb.DuckDBPyConnection:
    """Lock ``con`` down: from now on it reaches no file but ``allowed_paths`` (the one file the
    engine writes its result to) and those under ``directories`` (``curate explore``: the score
    files it reads in place), no network and no extension, and its configuration is locked,
    so nothing can turn them back on. What it loaded before (the score columns a policy needs)
    stays in its memory, or spilled to its temp directory, which DuckDB itself owns."""
    if allowed_paths:
        con.execute(f"SET allowed_paths = [{', '.join(literal(p) for p in allowed_paths)}]")
    if directories:
        con.execute(f"SET allowed_directories = [{', '.join(literal(d.rstrip('/') + '/') for d in directories)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con
