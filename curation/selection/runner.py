"""A compiled policy run out of core: scores -> a sandboxed DuckDB file -> ``decisions.parquet``.

One DuckDB connection of its own (:func:`curation.selection.sqlsafe.engine`), in three acts:

1. with the store's views (it reaches the score files, local or S3) it copies the columns the
   policy reads into table ``s0`` (with ``dropped_by``, and ``_not_scored`` when incomplete
   scores are allowed), then drops the views. The scorers' files are zipped row by row when
   their rows line up in (dataset, shard, key) order (one scoring run writes them so), joined on
   the key otherwise; a column only dedup compares is held as its 64-bit key (``_key``);
2. :func:`curation.selection.sqlsafe.sandbox` locks it: no file but the result's temp name, no
   network, no extension, the configuration locked; it runs the steps: the score columns are
   stored once, and each step stores only its ``dropped_by`` column (``_run_steps``), so a rule
   reads and sorts only the columns it names;
3. it writes the decision table with ``COPY`` (sorted by dataset, shard, key: a reader of one
   shard's keys reads few row groups; no sort when the zipped rows were in that order already)
   to a temp name beside the result, renamed into place (on S3: in the temp folder, then one upload).

Memory is bounded by DuckDB's ``memory_limit``: past it DuckDB spills its tables to a temp folder
of this run (removed at the end); no step passes rows through Python.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import duckdb

from curation.data import storage
from curation.scoring.store import VIEW_IDENTITY as IDENTITY
from curation.selection.rules import keyed_values
from curation.selection.sqlsafe import ident as q
from curation.selection.sqlsafe import literal as lit
from curation.selection.sqlsafe import engine, sandbox

DECISION_COLUMNS = "dataset, shard, key, kind, dropped_by"


def default_memory_limit() -> str:
    """A quarter of the machine's memory, between 256 MB and 4 GB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return f"{max(256, min(4096, total // 4 >> 20))}MB"


@dataclass
class Resources:
    """What one selection may use: DuckDB's memory limit, where it spills, its threads."""

    memory_limit: str | None = None  # e.g. "2GB"; default: default_memory_limit()
    temp_directory: str | None = None  # default: the system's temp folder
    threads: int | None = None  # default: DuckDB's (every core)

    def settings(self, spill: str) -> dict[str, Any]:
        s: dict[str, Any] = {"memory_limit": self.memory_limit or default_memory_limit(), "temp_directory": spill}
        if self.threads:
            s["threads"] = int(self.threads)
        return s


def _zip_columns(store: Any) -> dict[str, str] | None:
    """The ``scores`` view's columns (named as the store names them, ``column_sources``) as
    expressions over the scorers' views zipped by position (``t0``, ``t1``, ...); None when two
    sources would give one name."""
    index = {n: i for i, n in enumerate(store.views)}
    out = {c: f"COALESCE({', '.join(f't{i}.{q(c)}' for i in index.values())})" for c in IDENTITY}
    for alias, n, c in store.column_sources():
        if alias in out:
            return None
        out[alias] = f"t{index[n]}.{q(c)}"
    return out


def _load_zipped(con: duckdb.DuckDBPyConnection, store: Any, columns: list[str]) -> bool:
    """Table ``s0`` from the scorers' files zipped row by row (``POSITIONAL JOIN``: no join over the
    pool), when that is what the store's join gives: every scorer's rows have the first scorer's
    (dataset, shard, key) in the same order, and (dataset, shard, key) strictly increases down the
    table, so no key repeats. False (and no ``s0``) when it is not so: the caller joins."""
    views = store.views
    expr = _zip_columns(store)
    if expr is None or not views or any(c not in expr for c in columns):
        return False
    same = " AND ".join([f"t0.{c} IS NOT NULL" for c in IDENTITY[:3]] +
                        [f"t{i}.{c} = t0.{c}" for i in range(1, len(views)) for c in IDENTITY[:3]])
    zipped = " POSITIONAL JOIN ".join(f"{q(n)} t{i}" for i, n in enumerate(views))
    cols = ", ".join(f"{expr[c]} AS {q(c)}" for c in columns)
    con.execute(f"CREATE TABLE s0 AS SELECT {cols}, CAST(NULL AS VARCHAR) AS dropped_by, "
                f"coalesce({same}, false) AS _zip_ok FROM {zipped}")
    if con.execute("SELECT bool_and(_zip_ok) FROM s0").fetchall()[0][0] is not False:
        con.execute("ALTER TABLE s0 DROP COLUMN _zip_ok")
        if "dataset" in columns and "shard" in columns and "key" in columns and _ordered(con, "s0"):
            return True
    con.execute("DROP TABLE s0")
    return False


def _ordered(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether (dataset, shard, key) strictly increases with the row id: each row against the one
    before it, zipped by position (one pass, no sort)."""
    bad = con.execute(
        f"SELECT count(*) FROM (SELECT rowid AS r, dataset AS d, shard AS s, key AS k FROM {table} WHERE rowid > 0) a "
        f"POSITIONAL JOIN (SELECT rowid AS r0, dataset AS d0, shard AS s0, key AS k0 FROM {table}) b "
        f"WHERE a.r IS NOT NULL AND NOT coalesce(a.r = b.r0 + 1 AND (b.d0, b.s0, b.k0) < (a.d, a.s, a.k), false)"
    ).fetchall()[0][0]
    return bad == 0


def _load(store: Any, con: duckdb.DuckDBPyConnection, columns: list[str],
          missing: list[tuple[str, str, str]] | None) -> bool:
    """Table ``s0``: the columns the policy reads, ``dropped_by`` and (with ``missing``) ``_not_scored``.
    True when its rows are in (dataset, shard, key) order, each key once (the zipped load)."""
    view = type(store)(store.work, store.storage_options, con=con)  # the store's views, on this connection
    ordered = missing is None and _load_zipped(con, view, columns)
    cols = ", ".join(f"s.{q(c)}" for c in columns)
    if not ordered and missing is None:
        con.execute(f"CREATE TABLE s0 AS SELECT {cols}, CAST(NULL AS VARCHAR) AS dropped_by FROM scores s")
    elif missing is not None:
        import pyarrow as pa

        m = pa.table({"dataset": [x[0] for x in missing], "shard": [x[1] for x in missing],
                      "scorer": [x[2] for x in missing]}, schema=pa.schema([(n, pa.string()) for n in
                                                                            ("dataset", "shard", "scorer")]))
        con.register("_missing_in", m)
        con.execute(f"CREATE TABLE s0 AS SELECT {cols}, CAST(NULL AS VARCHAR) AS dropped_by, m.scorer AS _not_scored "
                    f"FROM scores s LEFT JOIN (SELECT dataset, shard, string_agg(scorer, ',' ORDER BY scorer) AS scorer "
                    f"FROM _missing_in GROUP BY ALL) m ON s.dataset = m.dataset AND s.shard = m.shard")
        con.unregister("_missing_in")
    for name in ["scores", *view.views]:
        con.execute(f"DROP VIEW IF EXISTS {q(name)}")
    return ordered


def _key(con: duckdb.DuckDBPyConnection, keyed: list[str]) -> None:
    """Each keyed column (``curation.selection.policy_sql.keyed_columns``) of ``s0`` becomes its
    64-bit ``hash`` (NULL stays NULL), and its values go aside (``keyed_values``) for the rows
    whose hash another row shares: a column that only dedup compares shrinks to 8 bytes a row."""
    for c in keyed:
        col = q(c)
        con.execute(f"CREATE TABLE {keyed_values(c)} AS SELECT rowid AS _rid, {col} AS _v FROM s0 WHERE {col} IS NOT "
                    f"NULL AND hash({col}) IN (SELECT hash({col}) FROM s0 WHERE {col} IS NOT NULL GROUP BY ALL "
                    f"HAVING count(*) > 1)")
        con.execute(f"ALTER TABLE s0 ALTER {col} SET DATA TYPE UBIGINT USING "
                    f"CASE WHEN {col} IS NOT NULL THEN hash({col}) END")


def _view(step: str, decisions: str | None) -> str:
    """Step ``step`` as a view: the base columns with ``dropped_by`` from ``decisions`` (one value
    per base row, in the base's row order, zipped on by POSITIONAL JOIN) and the row id ``_rid``."""
    if decisions is None:
        return f"CREATE VIEW {step} AS SELECT *, rowid AS _rid FROM _base"
    return (f"CREATE VIEW {step} AS SELECT b.* REPLACE (d.dropped_by AS dropped_by), b.rowid AS _rid "
            f"FROM _base b POSITIONAL JOIN {decisions} d")


def _run_steps(con: duckdb.DuckDBPyConnection, steps: list[tuple[str, str]], in_order: set[str] = frozenset()) -> None:
    """Run the steps over ``s0``. The score columns are stored once (``_base``); a step stores only
    its ``dropped_by`` column, ordered by row id, and ``s<k>`` is a view of the base with it, so a
    rule reads (and sorts) only the columns it names, and no step copies the pool's columns. A step in
    ``in_order`` (a mark: a projection of its source) keeps the base's row order and is not sorted."""
    con.execute("ALTER TABLE s0 RENAME TO _base")
    con.execute(_view("s0", None))
    made: list[str] = []  # what the newest step's view and the helpers after it hold
    for name, body in steps:
        if not name.startswith("s"):
            con.execute(f"CREATE TABLE {name} AS {body}")
            made.append(f"TABLE {name}")
            continue
        order = "" if name in in_order else " ORDER BY _rid"
        con.execute(f"CREATE TABLE _d{name} AS SELECT dropped_by FROM ({body}){order}")
        rows = con.execute(f"SELECT (SELECT count(*) FROM _d{name}) = (SELECT count(*) FROM _base)").fetchall()[0][0]
        assert rows, f"step {name} changed the number of rows"  # every step marks, none adds or removes
        con.execute(_view(name, f"_d{name}"))
        for old in reversed(made):  # a step: nothing before it is read again
            con.execute(f"DROP {old}")
        made = [f"VIEW {name}", f"TABLE _d{name}"]


def _counts(con: duckdb.DuckDBPyConnection, final: str) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, Any]] = {}
    for ds, kind, n, kept in con.execute(
            f"SELECT dataset, any_value(kind), count(*), count(*) FILTER (WHERE dropped_by IS NULL) FROM {final} "
            f"GROUP BY 1 ORDER BY 1").fetchall():
        counts[ds] = {"kind": kind, "scored": n, "kept": kept, "dropped": {}}
    for ds, reason, n in con.execute(
            f"SELECT dataset, dropped_by, count(*) FROM {final} WHERE dropped_by IS NOT NULL GROUP BY 1, 2 "
            f"ORDER BY 1, 3 DESC, 2").fetchall():
        counts[ds]["dropped"][reason] = n
    for ds, c in counts.items():
        assert c["kept"] + sum(c["dropped"].values()) == c["scored"], ds  # nothing dropped without a reason
    return counts


def _target(url: str, tmp: str, storage_options: dict | None) -> str:
    """Where COPY writes: a temp name beside ``url`` (renamed into place), or in ``tmp`` (uploaded)."""
    if storage.is_remote(url):
        return os.path.join(tmp, "decisions.parquet")
    _, path = storage.get_fs(url, storage_options)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")


def _publish(target: str, url: str, storage_options: dict | None) -> None:
    if storage.is_remote(url):
        with open(target, "rb") as src, storage.atomic_write(url, storage_options) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    else:
        os.replace(target, storage.get_fs(url, storage_options)[1])


def _kv(metadata: dict[str, str] | None) -> str:
    return f", KV_METADATA {{{', '.join(f'{lit(k)}: {lit(v)}' for k, v in metadata.items())}}}" if metadata else ""


def execute(store: Any, compiled: Any, url: str, resources: Resources | None = None,
            missing: list[tuple[str, str, str]] | None = None,
            tables: dict[str, Any] | None = None, metadata: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``compiled`` (``curation.selection.policy_sql.CompiledPolicy``) on ``store``; write the
    decisions to ``url``; return the counts per dataset. ``missing``: (dataset, shard, scorer)
    whose samples are dropped as ``not_scored:<scorer>`` (the steps must have been compiled for it).
    ``tables``: Arrow tables the steps read by name (rules' precomputed inputs, e.g. semantic_dedup's
    pairs), loaded before the connection is locked. ``metadata``: key-value pairs for the decision
    file's Parquet footer (the policy and inputs fingerprints).
    Raises ``duckdb.Error`` when a step does not run (the caller names the policy)."""
    res = resources or Resources()
    root = res.temp_directory or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="curate-select-", dir=root)
    target = _target(url, tmp, store.storage_options)
    try:
        with engine(res.settings(os.path.join(tmp, "spill"))) as con:
            ordered = _load(store, con, compiled.columns, missing)
            _key(con, compiled.keyed)
            for name, data in (tables or {}).items():
                con.register("_incoming", data)
                con.execute(f"CREATE TABLE {q(name)} AS SELECT * FROM _incoming")
                con.unregister("_incoming")
            sandbox(con, [target])
            _run_steps(con, compiled.steps, compiled.in_order)
            counts = _counts(con, compiled.final)
            order = "" if ordered else " ORDER BY dataset, shard, key"  # already in that order: no sort
            con.execute(f"COPY (SELECT {DECISION_COLUMNS} FROM {compiled.final}{order}) TO "
                        f"{lit(target)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880{_kv(metadata)})")
        _publish(target, url, store.storage_options)
        return counts
    finally:
        if os.path.exists(target):
            os.unlink(target)
        shutil.rmtree(tmp, ignore_errors=True)
