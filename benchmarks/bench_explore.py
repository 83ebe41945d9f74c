"""How fast `curate explore` answers over score stores of growing size, through its web app.

    python benchmarks/bench_explore.py --sizes 10000,100000,1000000 --json explore.json

Each store is `bench_scale.py`'s (``benchmarks/scale_store.py``: basic, clip and deltaloss score
files, 10,000 rows a shard, one dataset ``coyo``, 2 % exact and 2 % near duplicates) wired to a
real synthetic corpus: one synthesized shard of 10,000 image-caption pairs, whose keys and member
offsets (read by the tar scanner, as scoring records them) replace the store's, and one symlink
per store shard pointing at it, so every thumbnail is a real ranged read, JPEG decode and resize.

Per size: ``curate select`` with `bench_scale.py`'s policy (valid, dedup, near_dedup, a clip
threshold, top_k delta_loss) writes its decisions under ``<work>/selection/``; then the explorer
starts with ``--policy`` (it reuses those decisions: their footer records the same policy and
score files) and FastAPI's TestClient times, in this process, wall and CPU seconds (every thread):

- ``overview``: ``GET /`` (counts, the clip_score histogram per dataset), first and second time;
- ``rule_page``: ``GET /rule`` for the rule that drops most, then its 48 ``/thumb`` (cold cache);
  ``rule_page_cached``: the same again;
- ``query``: ``GET /query`` with a WHERE expression (run on the locked connection, no copy);
- ``sample``: ``GET /sample`` for one sample.

Baselines, on the same store in the same process: ``baseline_overview`` runs the queries the
overview ran before on every request (two GROUP BYs and, per dataset, a min/max and a binning
over the joined ``explore`` view); ``baseline_query`` the query box as it ran before (the columns
the expression reads copied into a fresh sandboxed connection per query). ``curate select`` runs
in its own process (timed with ``/usr/bin/time``), so the peak RSS reported is the explorer's.
Also reports the growth exponents over the sizes and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

PER_SHARD = 10_000


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - w, 4), round(time.process_time() - c, 4)


def real_corpus(tmp: str) -> tuple[str, list[tuple[str, int, int]]]:
    """One synthesized shard of PER_SHARD pairs: its path and (key, offset, size) of every sample."""
    from curation.corpus.spec import DatasetSpec, SynthConfig
    from curation.corpus.synth import synthesize
    from curation.data.shards import list_shards, read_shard

    corpus = os.path.join(tmp, "corpus")
    synthesize(corpus, SynthConfig(seed=1, datasets=[DatasetSpec("coyo", "pair", PER_SHARD, {}, PER_SHARD)]))
    url = list_shards(os.path.join(corpus, "coyo"))[0]
    return url, [(s.key, s.tar_offset, s.tar_size) for s in read_shard(url)]


def build_store(work: str, rows: int, real: str, members: list[tuple[str, int, int]]) -> None:
    """`bench_scale.py`'s store, each shard's keys and offsets those of the real shard (a symlink)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scale_store import write_store

    shards = write_store(work, rows, per_shard=PER_SHARD)
    keys = pa.array([k for k, _, _ in members], pa.string())
    offsets, sizes = pa.array([o for _, o, _ in members], pa.int64()), pa.array([s for _, _, s in members], pa.int64())
    links = os.path.join(work, "..", os.path.basename(work) + "-shards", "coyo")
    os.makedirs(links, exist_ok=True)
    for i in range(shards):
        link = os.path.abspath(os.path.join(links, f"{i:06d}.tar"))
        os.symlink(real, link)
        for scorer in ("basic", "clip", "deltaloss"):
            f = os.path.join(work, "scores", scorer, "dataset=coyo", f"{i:06d}.parquet")
            t = pq.read_table(f)
            md = dict(t.schema.metadata)
            md[b"curation.shard_url"] = link.encode()
            t = t.set_column(t.schema.get_field_index("key"), "key", keys)
            if scorer == "basic":
                t = t.append_column("tar_offset", offsets).append_column("tar_size", sizes)
            pq.write_table(t.replace_schema_metadata(md), f, compression="zstd")


def baseline_overview(ex, column: str = "clip_score") -> None:
    """The overview's queries as they ran before: over the joined view, every request."""
    con = ex.con.cursor()
    con.execute("SELECT dataset, any_value(kind), count(*), count(*) FILTER (WHERE dropped_by IS NULL) "
                "FROM explore GROUP BY 1 ORDER BY 1").fetchall()
    for ds, _, _ in con.execute("SELECT dataset, dropped_by, count(*) FROM explore WHERE dropped_by IS NOT NULL "
                                "GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2").fetchall()[:1]:
        lo, hi = con.execute(f"SELECT min({column}), max({column}) FROM explore WHERE dataset = ?", [ds]).fetchone()
        con.execute(f"SELECT least(CAST(floor(({column} - ?) / ?) AS INTEGER), 29), count(*) FROM explore "
                    f"WHERE dataset = ? AND {column} IS NOT NULL GROUP BY 1", [lo, (hi - lo) / 30, ds]).fetchall()


def baseline_query(ex, expr: str, col: str) -> None:
    """The query box as it ran before: the columns it reads copied into a fresh locked connection
    per query, then the count and the page there."""
    import duckdb

    from curation.selection.sqlsafe import SANDBOX_CONFIG, check_predicate, ident

    names = check_predicate(expr)
    need = [c for c in ex.columns if c in names or c in ("dataset", "shard", "key", "kind", "dropped_by", col)]
    with duckdb.connect(config=SANDBOX_CONFIG) as con:
        con.register("_incoming", ex.con.cursor().sql(f"SELECT {', '.join(map(ident, need))} FROM explore")
                     .to_arrow_reader())
        con.execute("CREATE TABLE explore AS SELECT * FROM _incoming")
        con.execute(f"SELECT count(*) FROM explore WHERE ({expr})").fetchall()
        con.execute(f"SELECT dataset, shard, key, kind, dropped_by, {col} FROM explore WHERE ({expr}) "
                    f"ORDER BY {col}, dataset, shard, key LIMIT 48").fetchall()


def _get(client, path: str, params: dict | None = None) -> str:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text[:500]
    return r.text


def _thumbs(client, html: str) -> int:
    srcs = [s.split('"')[0].replace("&amp;", "&") for s in html.split('class="thumb" loading="lazy" src="')[1:]]
    for s in srcs:
        r = client.get(s)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    return len(srcs)


def bench_store(rows: int, tmp: str, real: str, members: list) -> dict:
    import yaml
    from bench_scale import policy
    from fastapi.testclient import TestClient

    from curation.app.explore.data import Explorer
    from curation.app.explore.web import create_app

    work = os.path.join(tmp, f"store{rows}")
    build_store(work, rows, real, members)
    pol = os.path.join(tmp, "policy.yaml")
    with open(pol, "w") as f:
        yaml.safe_dump(policy(), f)
    sel = [sys.executable, "-m", "curation.app.cli", "select", "--policy", pol, "--work", work]
    t0 = time.perf_counter()  # `curate select` in its own process: this one's peak RSS stays the explorer's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["/usr/bin/time", "-f", "%U %S", *sel], capture_output=True, text=True, check=True, env=env)
    sw, sc = round(time.perf_counter() - t0, 2), round(sum(map(float, done.stderr.split()[-2:])), 2)
    ex, ew, ec = _timed(lambda: Explorer(work, policy=pol, cache=os.path.join(tmp, f"cache{rows}")))
    assert ex.reused, "the explorer ran the selection again"
    client = TestClient(create_app(ex))
    out = {"rows": rows, "select_wall_s": sw, "select_cpu_s": sc, "startup_wall_s": ew, "startup_cpu_s": ec}
    for name in ("overview", "overview_again"):
        _, w, c = _timed(lambda: _get(client, "/"))
        out.update({f"{name}_wall_s": w, f"{name}_cpu_s": c})
    _, w, c = _timed(lambda: baseline_overview(ex))
    out.update({"baseline_overview_wall_s": w, "baseline_overview_cpu_s": c})
    rule, n = max(((x, n) for r in ex.overview() for x, n in r["dropped"]), key=lambda t: t[1])
    for name in ("rule_page", "rule_page_cached"):
        k, w, c = _timed(lambda: _thumbs(client, _get(client, "/rule", {"dataset": "coyo", "rule": rule})))
        out.update({f"{name}_wall_s": w, f"{name}_cpu_s": c, f"{name}_thumbnails": k})
    out["rule"], out["rule_rows"] = rule, n
    _, w, c = _timed(lambda: ex.rule_page("coyo", rule, 1, True))  # its SQL alone (another page)
    out.update({"rule_page_sql_wall_s": w, "rule_page_sql_cpu_s": c})
    _, w, c = _timed(lambda: _get(client, "/query", {"where": "caption_words < 3 AND clip_score > 0.3",
                                                      "col": "clip_score"}))
    out.update({"query_wall_s": w, "query_cpu_s": c})
    _, w, c = _timed(lambda: baseline_query(ex, "caption_words < 3 AND clip_score > 0.3", "clip_score"))
    out.update({"baseline_query_wall_s": w, "baseline_query_cpu_s": c})
    shard, key = "000000", members[len(members) // 2][0]
    _, w, c = _timed(lambda: _get(client, "/sample", {"dataset": "coyo", "shard": shard, "key": key}))
    out.update({"sample_wall_s": w, "sample_cpu_s": c})
    return out


def _exponent(st: list[dict], field: str) -> float | None:
    a, b = st[0], st[-1]
    if len(st) < 2 or a[field] <= 0 or b[field] <= 0:
        return None
    return round(math.log(b[field] / a[field]) / math.log(b["rows"] / a["rows"]), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        real, members = real_corpus(tmp)
        res: dict = {"store": [bench_store(n, tmp, real, members) for n in sizes]}
    st = res["store"]
    for field in ("overview_wall_s", "overview_cpu_s", "rule_page_wall_s", "query_cpu_s"):
        res[f"growth_{field}"] = _exponent(st, field)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    res["cpus"] = os.cpu_count()
    res["load_average"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
