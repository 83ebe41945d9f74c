"""What the explorer's pages show, as DuckDB queries over the score store and the decisions.

Every page is an aggregate or a LIMIT/OFFSET page computed in DuckDB: no page loads all rows
into Python. The overview's counts are computed once at startup and each histogram once per
column (the store and the decisions do not change while the explorer runs); a histogram, a
rule's page and a score's deciles read the one scorer's files that hold their column, joined to
the decisions, not the join of every scorer. Nothing is written to the store: with ``--policy``
the decisions ``curate select`` wrote under ``<work>/selection/`` are reused when they record the
same policy and score files, else they are computed into the explorer's cache folder.

Once its views exist the connection is locked (``curation.selection.sqlsafe.sandbox``): it reads
the score files and decision files in place and nothing else, no network, no extension. A
query-box expression is checked exactly as a policy's ``sql`` rule is and runs on that locked
connection, without copying the pool.
"""

from __future__ import annotations

import json
import os
from typing import Any

from curation.app.explore.fetch import Location, SampleNotFound
from curation.data import storage
from curation.scoring.scorefile import score_file_url
from curation.scoring.store import ScoreStore
from curation.selection.sqlsafe import check_predicate, engine, ident, literal, sandbox

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

        work = work if storage.is_remote(work) else os.path.abspath(work)
        self.work, self.cache, self.so = work, os.path.abspath(cache), storage_options
        self.store = ScoreStore(work, storage_options, con=engine())  # no extension can load
        self.con = self.store.con
        self.reads: list[str] = []  # the decision files the locked connection may read
        self.reused: str | None = None  # the decisions `curate select` wrote, when reused
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
        self._numeric = _numeric(self.con.execute("DESCRIBE explore").fetchall())
        self._owner = _owners(self.store.views)
        shards, _ = self.store.inputs()  # where each scored shard is, from the score files' footers
        self._urls = {k: v["url"] for k, v in shards.items()}
        self._checksums = {k: v["checksum"] for k, v in shards.items()}
        sandbox(self.con, self.reads, [self.store.root])
        self._hist: dict[str, dict[str, dict[str, Any]]] = {}
        self._deciles: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._locs: dict[tuple[str, str, str], Location] = {}
        self._overview = self._count_overview()
        self._compare = self._count_compare()

    def _decisions_view(self, name: str, policy: Any, decisions: str | None) -> None:
        """A view of (dataset, shard, key, dropped_by): from a decisions file, from the policy's
        decisions already made from these score files, from a policy run now with its decisions
        written to the cache (never to the store), or all kept."""
        if policy is not None and decisions is None:
            decisions = self._policy_decisions(policy)
        elif decisions and not storage.is_remote(decisions):
            decisions = os.path.abspath(decisions)
        if decisions:
            self.reads.append(decisions)
        src = (f"SELECT dataset, shard, key, dropped_by FROM read_parquet({literal(decisions)})" if decisions else
               "SELECT dataset, shard, key, CAST(NULL AS VARCHAR) AS dropped_by FROM scores")
        self.con.execute(f"CREATE OR REPLACE VIEW {ident(name)} AS {src}").fetchall()

    def _policy_decisions(self, policy: Any) -> str:
        """The decision file of ``policy`` over the score files present now: the one `curate select`
        wrote under ``<work>/selection/<policy>/`` or one in the cache, when its footer records the
        same policy and score files (``ScoreStore.fingerprint``); else the selection runs now."""
        from curation.selection.policy import recorded_fingerprints, run_selection

        want = {"policy_fingerprint": policy.fingerprint(), "inputs_fingerprint": self.store.fingerprint()}
        selected = storage.join(self.work, "selection", want["policy_fingerprint"], "decisions.parquet")
        cached = os.path.join(self.cache, f"decisions-{want['policy_fingerprint']}-{want['inputs_fingerprint']}.parquet")
        for url in (selected, cached):
            have = recorded_fingerprints(url, self.so)
            if all(have.get(k) == v for k, v in want.items()):
                self.reused = url
                return url
        return run_selection(self.store, policy, out=cached).decisions_url

    def _run(self, sql: str, params: list | None = None) -> Any:
        """A fresh cursor per query: the web server's threads never share one result set."""
        return self.con.cursor().execute(sql, params or [])

    def _source(self, column: str) -> str:
        """The scorer view that holds ``column``, as a relation with that column named ``v``."""
        scorer, raw = self._owner[column]
        return f"(SELECT dataset, shard, key, kind, {ident(raw)} AS v FROM {ident(scorer)})"

    # ---- overview (computed once: the store and the decisions do not change while it runs)
    def _count_overview(self) -> list[dict[str, Any]]:
        if not self.store.views:
            return []
        first = ident(next(iter(self.store.views)))
        kinds = dict(self._run(f"SELECT dataset, any_value(kind) FROM {first} GROUP BY 1").fetchall())
        rows = self._run("SELECT dataset, dropped_by, count(*) FROM decisions GROUP BY 1, 2 "
                         "ORDER BY 1, 3 DESC, 2").fetchall()
        out: dict[str, dict[str, Any]] = {}
        for ds, reason, n in rows:
            r = out.setdefault(ds, {"dataset": ds, "kind": kinds.get(ds), "scored": 0, "kept": 0, "dropped": []})
            r["scored"] += n
            if reason is None:
                r["kept"] += n
            else:
                r["dropped"].append((reason, n))
        return [out[ds] for ds in sorted(out)]

    def _count_compare(self) -> dict[str, tuple[int, int]]:
        if not self.has_compare:
            return {}
        rows = self._run("SELECT dataset, count(*) FILTER (WHERE a.dropped_by IS NOT NULL AND b.dropped_by IS NULL), "
                         "count(*) FILTER (WHERE a.dropped_by IS NULL AND b.dropped_by IS NOT NULL) "
                         "FROM decisions a JOIN decisions_b b USING (dataset, shard, key) GROUP BY 1").fetchall()
        return {ds: (x, y) for ds, x, y in rows}

    def overview(self) -> list[dict[str, Any]]:
        return [{**r, "dropped": list(r["dropped"])} for r in self._overview]

    def compare_counts(self) -> dict[str, tuple[int, int]]:
        """Per dataset: (kept by the second policy and dropped by the first, the other way round)."""
        return self._compare

    def compare_page(self, dataset: str, page: int) -> tuple[list[dict], int]:
        if not self.has_compare:
            raise QueryError("no second policy: start with --compare")
        return self._page(self.con.cursor(), "dataset = ? AND dropped_by IS NOT NULL AND compare_dropped_by IS NULL",
                          [dataset], None, page, False)

    def numeric_columns(self) -> list[str]:
        return list(self._numeric)

    def histogram(self, dataset: str, column: str) -> dict[str, Any]:
        if column not in self._numeric:
            raise QueryError(f"no numeric score column {column!r}")
        if column not in self._hist:  # every dataset's at once, from the one scorer's files
            src = self._source(column)
            rows = self._run(
                f"WITH t AS (SELECT dataset, v FROM {src} WHERE v IS NOT NULL), "
                f"m AS (SELECT dataset, min(v) AS lo, max(v) AS hi FROM t GROUP BY 1) "
                f"SELECT dataset, any_value(lo), any_value(hi), least(CAST(floor((v - lo) / "
                f"coalesce(nullif((hi - lo) / {BINS}, 0), 1.0)) AS INTEGER), {BINS - 1}) AS b, count(*) "
                f"FROM t JOIN m USING (dataset) GROUP BY dataset, b").fetchall()
            hist: dict[str, dict[str, Any]] = {}
            for ds, lo, hi, b, n in rows:
                h = hist.setdefault(ds, {"lo": float(lo), "hi": float(hi), "bins": [0] * BINS})
                h["bins"][b] = n
            self._hist[column] = hist
        h = self._hist[column].get(dataset) or {"lo": None, "hi": None, "bins": []}
        return {**h, "thresholds": self.thresholds(dataset, column)}

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
        """The samples a rule dropped: the decisions joined to the one scorer's files holding its column."""
        col = self.rule_column(dataset, label)
        total = next((n for r in self._overview if r["dataset"] == dataset for x, n in r["dropped"] if x == label), 0)
        src = self._source(col) if col in self._owner else (
            f"(SELECT dataset, shard, key, kind, NULL AS v FROM {ident(next(iter(self.store.views)))})")
        order = f"s.v {'DESC' if desc else 'ASC'} NULLS LAST, " if col in self._owner else ""
        rows = self._run(f"SELECT d.dataset, d.shard, d.key, s.kind, d.dropped_by, s.v FROM decisions d "
                         f"LEFT JOIN {src} s USING (dataset, shard, key) WHERE d.dataset = ? AND d.dropped_by = ? "
                         f"ORDER BY {order}d.shard, d.key LIMIT {PAGE} OFFSET {max(0, page) * PAGE}",
                         [dataset, label]).fetchall()
        return [_card(r) for r in rows], int(total), col

    def _page(self, con: Any, where: str, params: list, col: str | None, page: int, desc: bool) -> tuple[list[dict], int]:
        """One page of the ``explore`` view and the number of rows matching, in one pass."""
        order = f"{ident(col)} {'DESC' if desc else 'ASC'} NULLS LAST, " if col else ""
        value = ident(col) if col else "NULL"
        rows = con.execute(f"SELECT dataset, shard, key, kind, dropped_by, {value}, count(*) OVER () FROM explore "
                           f"WHERE {where} ORDER BY {order}dataset, shard, key LIMIT {PAGE} OFFSET {max(0, page) * PAGE}",
                           params).fetchall()
        total = rows[0][-1] if rows else con.execute(f"SELECT count(*) FROM explore WHERE {where}", params).fetchone()[0]
        return [_card(r[:6]) for r in rows], int(total)

    def query(self, expr: str, page: int, col: str | None = None, desc: bool = False) -> tuple[list[dict], int]:
        """Samples matching a WHERE expression, checked as a policy's ``sql`` rule is and run on the
        locked connection (it reads the score files in place: no copy per query)."""
        try:
            check_predicate(expr)
        except ValueError as e:
            raise QueryError(str(e)) from None
        if col is not None and col not in self.columns:
            raise QueryError(f"unknown column {col!r}")
        try:
            return self._page(self.con.cursor(), f"({expr})", [], col, page, desc)
        except Exception as e:  # noqa: BLE001 - DuckDB's message says what is wrong with the expression
            raise QueryError(f"the expression does not run: {e}") from None

    def deciles(self, dataset: str, column: str, per: int = 6) -> list[dict[str, Any]]:
        """``per`` samples from each decile of ``column`` (lowest value first within a decile)."""
        if column not in self._numeric:
            raise QueryError(f"no numeric score column {column!r}")
        if (dataset, column) not in self._deciles:
            rows = self._run(
                f"WITH t AS (SELECT dataset, shard, key, kind, v, ntile(10) OVER (ORDER BY v) AS d "
                f"FROM {self._source(column)} WHERE dataset = ? AND v IS NOT NULL), "
                f"r AS (SELECT *, row_number() OVER (PARTITION BY d ORDER BY hash(key)) AS i FROM t) "
                f"SELECT r.d, dataset, shard, key, r.kind, x.dropped_by, r.v FROM r "
                f"LEFT JOIN decisions x USING (dataset, shard, key) WHERE r.i <= ? ORDER BY r.d, r.v",
                [dataset, per]).fetchall()
            out: dict[int, dict[str, Any]] = {}
            for r in rows:
                out.setdefault(r[0], {"decile": r[0], "samples": []})["samples"].append(_card(r[1:7]))
            self._deciles[(dataset, column)] = list(out.values())
        return [{"decile": d["decile"], "samples": [dict(c) for c in d["samples"]]} for d in self._deciles[(dataset, column)]]

    # ---- one sample
    def shard_url(self, dataset: str, shard: str) -> str:
        try:
            return self._urls[(dataset, shard)]
        except KeyError:
            raise SampleNotFound(f"no scored shard {shard!r} in dataset {dataset!r}") from None

    def locate_many(self, cards: list[dict]) -> None:
        """Where the cards' samples lie in their shards, in one query over their shards' `basic`
        score files (remembered: the page's thumbnails ask again)."""
        want = {(c["dataset"], c["shard"], c["key"]) for c in cards} - set(self._locs)
        if "tar_offset" not in self.store.views.get("basic", []):
            return
        have = self.store.shards("basic")
        want = {k for k in want if (k[0], k[1]) in self._urls and (k[0], k[1]) in have}
        if not want:
            return
        files = sorted({score_file_url(self.work, "basic", ds, sh) for ds, sh, _ in want})
        keys = sorted(want)
        values = ", ".join(["(?, ?, ?)"] * len(keys))
        rows = self._run(f"SELECT dataset, shard, key, tar_offset, tar_size FROM read_parquet([{', '.join(map(literal, files))}], "
                         f"union_by_name = true) JOIN (VALUES {values}) w(dataset, shard, key) USING (dataset, shard, key)",
                         [x for k in keys for x in k]).fetchall()
        for ds, sh, key, off, size in rows:
            self._remember(Location(ds, sh, key, self._urls[(ds, sh)], off, size, self._checksums.get((ds, sh))))

    def _remember(self, loc: Location) -> Location:
        if len(self._locs) > 100_000:
            self._locs.clear()
        self._locs[(loc.dataset, loc.shard, loc.key)] = loc
        return loc

    def locate(self, dataset: str, shard: str, key: str) -> Location:
        known = self._locs.get((dataset, shard, key))
        if known is not None:
            return known
        url = self.shard_url(dataset, shard)
        f = score_file_url(self.work, "basic", dataset, shard)
        off = size = None
        if "basic" in self.store.views and "tar_offset" in self.store.views["basic"]:
            row = self._run(f"SELECT tar_offset, tar_size FROM read_parquet({literal(f)}) WHERE key = ?",
                            [key]).fetchone()
            if row is None:
                raise SampleNotFound(f"no key {key!r} in shard {dataset}/{shard}")
            off, size = row
        return self._remember(Location(dataset, shard, key, url, off, size, self._checksums.get((dataset, shard))))

    def scores(self, dataset: str, shard: str, key: str) -> dict[str, Any]:
        cur = self._run("SELECT * FROM explore WHERE dataset = ? AND shard = ? AND key = ?", [dataset, shard, key])
        row = cur.fetchone()
        if row is None:
            raise SampleNotFound(f"no scores for {dataset}/{shard}/{key}")
        return dict(zip([d[0] for d in cur.description], row))


def _numeric(described: list[tuple]) -> list[str]:
    skip = {"tar_offset", "tar_size"}
    return [r[0] for r in described if r[0] not in skip and
            any(t in r[1] for t in ("INT", "FLOAT", "DOUBLE", "DECIMAL", "REAL"))]


def _owners(views: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """Each column of the ``scores`` view -> (the scorer view holding it, its name there)."""
    counts: dict[str, int] = {}
    for cols in views.values():
        for c in cols:
            counts[c] = counts.get(c, 0) + 1
    return {(f"{n}_{c}" if (c == "error" or counts[c] > 1) else c): (n, c)
            for n, cols in views.items() for c in cols if c not in ("dataset", "shard", "key", "kind")}


def _card(r: tuple) -> dict[str, Any]:
    ds, shard, key, kind, dropped, value = r
    return {"dataset": ds, "shard": shard, "key": key, "kind": kind, "dropped_by": dropped,
            "value": round(value, 4) if isinstance(value, float) else value}
