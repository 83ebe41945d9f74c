"""How fast `curate explore` answers: the overview and a rule's first page over score stores of
growing size, and a rule page's 48 thumbnails over a real synthetic corpus (cold, then cached).

    python benchmarks/bench_explore.py --sizes 10000,100000,1000000 --json explore.json

Score stores are synthetic `basic` + `clip`-like score files (the columns the policy reads,
random values, one file per 10,000-row shard, real score-file metadata); the policy runs at
startup (timed apart). The thumbnail part synthesizes a small corpus, scores it with `basic`
(so offsets are recorded) and fetches a rule page through the app (FastAPI's TestClient).
Reports wall and CPU seconds, the overview's growth exponent over the sizes, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POLICY = {"defaults": [{"rule": "valid", "min_caption_words": 2}],
          "datasets": {"ds0": [{"rule": "threshold", "column": "clip_score", "min": 0.3}],
                       "ds1": [{"rule": "top_fraction", "column": "clip_score", "fraction": 0.5}]}}


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - w, 4), round(time.process_time() - c, 4)


def build_store(work: str, rows: int, shard_rows: int = 10_000, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    shard_rows = min(shard_rows, rows // 2)
    for i in range(rows // shard_rows):
        ds, shard, n = f"ds{i % 2}", f"{i:05d}", shard_rows
        t = pa.table({
            "dataset": [ds] * n, "shard": [shard] * n, "key": [f"{j:09d}" for j in range(n)], "kind": ["pair"] * n,
            "error": pa.nulls(n, pa.string()), "caption_words": rng.integers(0, 30, n).astype("int32"),
            "decodable": np.ones(n, dtype=bool), "width": rng.integers(16, 512, n).astype("int32"),
            "height": rng.integers(16, 512, n).astype("int32"), "aspect_ratio": (1 + rng.random(n)).astype("float32"),
            "clip_score": rng.random(n).astype("float32"),
            "tar_offset": np.arange(n, dtype="int64") * 4096, "tar_size": np.full(n, 4096, dtype="int64")})
        md = {"scorer": "basic", "config_hash": "bench", "identity": "{}", "dataset": ds, "rows": str(n),
              "shard_url": f"/nonexistent/{ds}/{shard}.tar", "shard_checksum": f"sha256:{i:064x}"}
        t = t.replace_schema_metadata({f"curation.{k}": v for k, v in md.items()})
        out = os.path.join(work, "scores", "basic", f"dataset={ds}")
        os.makedirs(out, exist_ok=True)
        pq.write_table(t, os.path.join(out, f"{shard}.parquet"))


def bench_store(rows: int, tmp: str) -> dict:
    import yaml

    from curation.app.explore.data import Explorer

    work = os.path.join(tmp, f"store{rows}")
    build_store(work, rows)
    pol = os.path.join(tmp, "policy.yaml")
    with open(pol, "w") as f:
        yaml.safe_dump(POLICY, f)
    ex, sw, sc = _timed(lambda: Explorer(work, policy=pol, cache=os.path.join(tmp, f"cache{rows}")))

    def overview():
        rows_ = ex.overview()
        for r in rows_:
            ex.histogram(r["dataset"], "clip_score")
        return rows_

    _, ow, oc = _timed(overview)
    (cards, total, _), rw, rc = _timed(lambda: ex.rule_page("ds0", "threshold:clip_score>=0.3", 0, False))
    (qcards, qtotal), qw, qc = _timed(lambda: ex.query("caption_words < 3 AND clip_score > 0.9", 0, "clip_score"))
    return {"rows": rows, "startup_wall_s": sw, "startup_cpu_s": sc, "overview_wall_s": ow, "overview_cpu_s": oc,
            "rule_page_sql_wall_s": rw, "rule_page_sql_cpu_s": rc, "rule_rows": total, "page_cards": len(cards),
            "query_wall_s": qw, "query_cpu_s": qc, "query_rows": qtotal}


def bench_thumbs(tmp: str) -> dict:
    import yaml
    from fastapi.testclient import TestClient

    from curation.app.explore.data import Explorer
    from curation.app.explore.web import create_app
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from curation.data.shards import dataset_of, list_shards
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local

    corpus, work = os.path.join(tmp, "corpus"), os.path.join(tmp, "work")
    synthesize(corpus, SynthConfig(seed=1, datasets=[DatasetSpec("coyo_synth", "pair", 300, {}, 100)]))
    score_local([ShardTask(u, dataset_of(u)) for u in list_shards(f"{corpus}/coyo_synth")], ScorerSpec("basic"), work)
    pol = os.path.join(tmp, "tpolicy.yaml")
    with open(pol, "w") as f:
        yaml.safe_dump({"defaults": [{"rule": "threshold", "column": "caption_words", "min": 100}]}, f)
    ex = Explorer(work, policy=pol, cache=os.path.join(tmp, "tcache"))
    label = ex.overview()[0]["dropped"][0][0]
    client = TestClient(create_app(ex))
    out = {}
    for run in ("cold", "cached"):
        def page():
            r = client.get("/rule", params={"dataset": "coyo_synth", "rule": label})
            assert r.status_code == 200, r.text
            srcs = [s.split('"')[0].replace("&amp;", "&") for s in r.text.split('class="thumb" loading="lazy" src="')[1:]]
            for s in srcs:
                assert client.get(s).status_code == 200
            return len(srcs)
        n, w, c = _timed(page)
        out[run] = {"thumbnails": n, "wall_s": w, "cpu_s": c}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        res = {"store": [bench_store(n, tmp) for n in sizes], "thumbnails": bench_thumbs(tmp)}
    st = res["store"]
    if len(st) >= 2 and st[0]["overview_wall_s"] > 0:
        res["overview_growth_exponent"] = round(math.log(st[-1]["overview_wall_s"] / st[0]["overview_wall_s"])
                                                / math.log(st[-1]["rows"] / st[0]["rows"]), 3)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    res["cpus"] = os.cpu_count()
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
