"""What the explorer's pages show, as DuckDB queries over the score store and the decisions.

Every page is an aggregate or a LIMIT/OFFSET page computed in DuckDB: no page loads all rows
into Python. Nothing is written to the store: decisions computed from ``--policy`` go to the
explorer's cache folder. A query-box expression is checked and sandboxed exactly as a policy's
``sql`` rule is (``curation.selection.sqlsafe``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from curation.app.explore.fetch import Location, SampleNotFound
from curation.data import storage
from curation.scoring.scorefile import score_file_url
from curation.scoring.store import ScoreStore
from curation.selection.sqlsafe import check_predicate, ident, literal, sandboxed_copy

PAGE = 48
BINS = 30


class QueryError(ValueError):
    """A query-box expression that is refused or does not run."""


class Explorer:
    def __init__(self, work: str, policy: str | None = None, decisions: str | None = None,
                 manifest: str | None = None, cache: str = ".", storage_options: dict[str, Any] | None = None,
                 compare: str | None = None) -> None:
        """``compare``: a second policy (YAML) or decisions file: what it keeps that the first drops."""
        from curation.selection.policy import load_policy

        self.work, self.cache, self.so = work, cache, storage_options
        self.store = ScoreStore(work, storage_options)
        self.con = self.store.con
        self.manifest = json.loads(storage.read_bytes(manifest, storage_options)) if manifest else None
        if self.manifest and not (policy or decisions):  # a manifest names its policy and decision table
            decisions = self.manifest.get("decisions")
            self.policy = load_policy(self.manifest["policy"]) if self.manifest.get("policy") else None
        else:
            self.policy = load_policy(policy) if policy else None
        self.has_decisions = bool(self.policy or decisions)
        self._decisions_view("decisions", self.policy, decisions)
        self.has_compare = compare is not None
        if compare is not None:
            is_policy = compare.endswith((".yaml", ".yml"))
            self._decisions_view("decisions_b", load_policy(compare) if is_policy else None,
                                 None if is_policy else compare)
        b = "LEFT JOIN decisions_b b USING (dataset, shard, key)" if compare is not None else ""
        self.con.execute("CREATE OR REPLACE VIEW explore AS SELECT s.*, d.dropped_by"
                         + (", b.dropped_by AS compare_dropped_by" if b else "")
                         + f" FROM scores s LEFT JOIN decisions d USING (dataset, shard, key) {b}").fetchall()
        self.columns = self.store.columns("explore")
        shards, _ = self.store.inputs()  # where each scored shard is, from the score files' footers
        self._urls = {k: v["url"] for k, v in shards.items()}
        self._checksums = {k: v["checksum"] for k, v in shards.items()}

    def _decisions_view(self, name: str, policy: Any, decisions: str | None) -> None:
        """A view of (dataset, shard, key, dropped_by): from a decisions file, or from a policy run
        now with its decisions written to the cache (never to the store), or all kept."""
        from curation.selection.policy import run_selection

        if policy is not None and decisions is None:
            out = os.path.join(self.cache, f"decisions-{policy.fingerprint()}.parquet")
            decisions = run_selection(self.store, policy, out=out).decisions_url
        src = (f"SELECT dataset, shard, key, dropped_by FROM read_parquet({literal(decisions)})" if decisions else
               "SELECT dataset, shard, key, CAST(NULL AS VARCHAR) AS dropped_by FROM scores")
        self.con.execute(f"CREATE OR REPLACE VIEW {ident(name)} AS {src}").fetchall()

    def compare_counts(self) -> dict[str, tuple[int, int]]:
        """Per dataset: (kept by the second policy and dropped by the first, the other way round)."""
        if not self.has_compare:
            return {}
        rows = self._run("SELECT dataset, count(*) FILTER (WHERE dropped_by IS NOT NULL AND compare_dropped_by IS NULL), "
                         "count(*) FILTER (WHERE dropped_by IS NULL AND compare_dropped_by IS NOT NULL) "
                         "FROM explore GROUP BY 1").fetchall()
        return {ds: (a, b) for ds, a, b in rows}

    def compare_page(self, dataset: str, page: int) -> tuple[list[dict], int]:
        if not self.has_compare:
            raise QueryError("no second policy: start with --compare")
        return self._page(self.con.cursor(), "dataset = ? AND dropped_by IS NOT NULL AND compare_dropped_by IS NULL",
                          [dataset], None, page, False)

    def _run(self, sql: str, params: list | None = None) -> Any:
        """A fresh cursor per query: the web server's threads never share one result set."""
        return self.con.cursor().execute(sql, params or [])

    # ---- overview
    def numeric_columns(self) -> list[str]:
        rows = self._run("DESCRIBE explore").fetchall()
        skip = {"tar_offset", "tar_size"}
        return [r[0] for r in rows if r[0] not in skip and
                any(t in r[1] for t in ("INT", "FLOAT", "DOUBLE", "DECIMAL", "REAL"))]

    def overview(self) -> list[dict[str, Any]]:
        rows = self._run(
            "SELECT dataset, any_value(kind), count(*), count(*) FILTER (WHERE dropped_by IS NULL) "
            "FROM explore GROUP BY 1 ORDER BY 1").fetchall()
        out = {ds: {"dataset": ds, "kind": k, "scored": n, "kept": kept, "dropped": []} for ds, k, n, kept in rows}
        for ds, reason, n in self._run(
                "SELECT dataset, dropped_by, count(*) FROM explore WHERE dropped_by IS NOT NULL "
                "GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2").fetchall():
            out[ds]["dropped"].append((reason, n))
        return list(out.values())

    def histogram(self, dataset: str, column: str) -> dict[str, Any]:
        if column not in self.numeric_columns():
            raise QueryError(f"no numeric score column {column!r}")
        c = ident(column)
        lo, hi = self._run(f"SELECT min({c}), max({c}) FROM explore WHERE dataset = ?", [dataset]).fetchone()
        if lo is None:
            return {"lo": None, "hi": None, "bins": [], "thresholds": []}
        width = (hi - lo) / BINS or 1.0
        counts = dict(self._run(
            f"SELECT least(CAST(floor(({c} - ?) / ?) AS INTEGER), {BINS - 1}) AS b, count(*) FROM explore "
            f"WHERE dataset = ? AND {c} IS NOT NULL GROUP BY 1", [lo, width, dataset]).fetchall())
        return {"lo": float(lo), "hi": float(hi), "bins": [counts.get(i, 0) for i in range(BINS)],
                "thresholds": self.thresholds(dataset, column)}

    def thresholds(self, dataset: str, column: str) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        if self.policy is None:
            return out
        for i, rule in enumerate(self.policy.rules_for(dataset)):
            if getattr(rule, "rule", "") == "threshold" and rule.column == column:
                out += [(f"{rule.label(i)} min", float(rule.min))] if rule.min is not None else []
                out += [(f"{rule.label(i)} max", float(rule.max))] if rule.max is not None else []
        return out

    def rule_column(self, dataset: str, label: str) -> str | None:
        """The score column a rule reads (the first one), for its grid."""
        if self.policy is None:
            return None
        for i, rule in enumerate(self.policy.rules_for(dataset)):
            if rule.label(i) == label:
                cols = [c for c in rule.columns(self.columns) if c in self.columns]
                return cols[0] if cols else None
        return {"valid:min_size": "width", "valid:max_aspect_ratio": "aspect_ratio",
                "valid:min_caption_words": "caption_words"}.get(label)

    # ---- grids (LIMIT/OFFSET pages)
    def rule_page(self, dataset: str, label: str, page: int, desc: bool) -> tuple[list[dict], int, str | None]:
        col = self.rule_column(dataset, label)
        where, params = "dataset = ? AND dropped_by = ?", [dataset, label]
        return self._page(self.con.cursor(), where, params, col, page, desc) + (col,)

    def _page(self, con: Any, where: str, params: list, col: str | None, page: int, desc: bool,
              view: str = "explore") -> tuple[list[dict], int]:
        total = con.execute(f"SELECT count(*) FROM {view} WHERE {where}", params).fetchone()[0]
        order = f"{ident(col)} {'DESC' if desc else 'ASC'} NULLS LAST, " if col else ""
        value = ident(col) if col else "NULL"
        rows = con.execute(f"SELECT dataset, shard, key, kind, dropped_by, {value} FROM {view} WHERE {where} "
                           f"ORDER BY {order}dataset, shard, key LIMIT {PAGE} OFFSET {max(0, page) * PAGE}",
                           params).fetchall()
        return [_card(r) for r in rows], int(total)

    def query(self, expr: str, page: int, col: str | None = None, desc: bool = False) -> tuple[list[dict], int]:
        """Samples matching a WHERE expression, checked and sandboxed as a policy's ``sql`` rule."""
        try:
            names = check_predicate(expr)
        except ValueError as e:
            raise QueryError(str(e)) from None
        if col is not None and col not in self.columns:
            raise QueryError(f"unknown column {col!r}")
        need = self.columns if names is None else [
            c for c in self.columns if c in names or c in ("dataset", "shard", "key", "kind", "dropped_by", col)]
        con = sandboxed_copy(self.con.cursor(), "explore", need)
        try:
            return self._page(con, f"({expr})", [], col, page, desc)
        except Exception as e:  # noqa: BLE001 - DuckDB's message says what is wrong with the expression
            raise QueryError(f"the expression does not run: {e}") from None
        finally:
            con.close()

    def deciles(self, dataset: str, column: str, per: int = 6) -> list[dict[str, Any]]:
        """``per`` samples from each decile of ``column`` (lowest value first within a decile)."""
        if column not in self.numeric_columns():
            raise QueryError(f"no numeric score column {column!r}")
        c = ident(column)
        rows = self._run(
            f"WITH t AS (SELECT dataset, shard, key, kind, dropped_by, {c} AS v, ntile(10) OVER (ORDER BY {c}) AS d "
            f"FROM explore WHERE dataset = ? AND {c} IS NOT NULL), "
            f"r AS (SELECT *, row_number() OVER (PARTITION BY d ORDER BY hash(key)) AS i FROM t) "
            f"SELECT d, dataset, shard, key, kind, dropped_by, v, min(v) OVER (PARTITION BY d), "
            f"max(v) OVER (PARTITION BY d) FROM r WHERE i <= ? ORDER BY d, v", [dataset, per]).fetchall()
        out: dict[int, dict[str, Any]] = {}
        for r in rows:
            out.setdefault(r[0], {"decile": r[0], "samples": []})["samples"].append(_card(r[1:7]))
        return list(out.values())

    # ---- one sample
    def shard_url(self, dataset: str, shard: str) -> str:
        try:
            return self._urls[(dataset, shard)]
        except KeyError:
            raise SampleNotFound(f"no scored shard {shard!r} in dataset {dataset!r}") from None

    def locate(self, dataset: str, shard: str, key: str) -> Location:
        url = self.shard_url(dataset, shard)
        f = score_file_url(self.work, "basic", dataset, shard)
        off = size = None
        if "basic" in self.store.views and "tar_offset" in self.store.views["basic"]:
            row = self._run(f"SELECT tar_offset, tar_size FROM read_parquet({literal(f)}) WHERE key = ?",
                                   [key]).fetchone()
            if row is None:
                raise SampleNotFound(f"no key {key!r} in shard {dataset}/{shard}")
            off, size = row
        return Location(dataset, shard, key, url, off, size, self._checksums.get((dataset, shard)))

    def scores(self, dataset: str, shard: str, key: str) -> dict[str, Any]:
        cur = self._run("SELECT * FROM explore WHERE dataset = ? AND shard = ? AND key = ?", [dataset, shard, key])
        row = cur.fetchone()
        if row is None:
            raise SampleNotFound(f"no scores for {dataset}/{shard}/{key}")
        return dict(zip([d[0] for d in cur.description], row))


def _card(r: tuple) -> dict[str, Any]:
    ds, shard, key, kind, dropped, value = r
    return {"dataset": ds, "shard": shard, "key": key, "kind": kind, "dropped_by": dropped,
            "value": round(value, 4) if isinstance(value, float) else value}
