"""Semantic dedup (``curation/selection/semantic_dedup.py``): recall against brute force, and time
and memory as the number of embeddings grows.

Embeddings: ``d``-dimensional, around ``n / 1000`` topic centres, 30 % of them near-copies of
another (cosine mostly >= 0.95), L2-normalized. For each size n: faiss spherical k-means with
K = n / 1000 clusters (about 1000 embeddings each, 2 probes), then all pairs within each cluster
at cosine >= 0.95. At --recall-n (20k) the pairs are compared with a brute-force all-pairs search.

    python benchmarks/bench_semantic_dedup.py [--sizes 100000 300000 1000000] [--recall-n 20000] [--dim 512] [--json out.json]

Targets (issue 26): recall >= 0.99 at 20k; 1M embeddings in <= 10 min on this machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np


def embeddings(n: int, d: int, seed: int = 0, dup_share: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topics = max(10, n // 1000)
    centres = rng.standard_normal((topics, d), dtype=np.float32)
    emb = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 65536):  # in chunks: bounded temporaries
        m = min(65536, n - lo)
        emb[lo:lo + m] = centres[rng.integers(0, topics, m)] + rng.standard_normal((m, d), dtype=np.float32) * 0.9
    dups = np.flatnonzero(rng.random(n) < dup_share)
    src = rng.integers(0, n, len(dups))
    # copies at cosine ~0.93-1.0 to their source: some just below the threshold, many near it
    noise = rng.standard_normal((len(dups), d), dtype=np.float32) * (0.5 * rng.random((len(dups), 1), dtype=np.float32))
    emb[dups] = emb[src] + noise
    return emb


def run_size(n: int, d: int, threshold: float, probes: int) -> dict:
    from curation.selection.semantic_dedup import semantic_pairs

    emb = embeddings(n, d)
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = semantic_pairs(emb, threshold, clusters=max(1, n // 1000), probes=probes, inplace=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": n, "dim": d, "clusters": max(1, n // 1000), "pairs": int(len(pairs)), "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def recall(n: int, d: int, threshold: float, probes: int) -> dict:
    from curation.selection.semantic_dedup import brute_force_pairs, semantic_pairs

    emb = embeddings(n, d, seed=1)
    t0 = time.process_time()
    truth = {tuple(p) for p in brute_force_pairs(emb, threshold)}
    brute_cpu = time.process_time() - t0
    t0 = time.process_time()
    found = {tuple(p) for p in semantic_pairs(emb, threshold, clusters=max(1, n // 1000), probes=probes)}
    ours_cpu = time.process_time() - t0
    return {"n": n, "dim": d, "true_pairs": len(truth), "found_pairs": len(found),
            "recall": round(len(found & truth) / max(1, len(truth)), 5), "false_pairs": len(found - truth),
            "brute_force_cpu_s": round(brute_cpu, 2), "clustered_cpu_s": round(ours_cpu, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--recall-n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    report: dict = {"benchmark": "bench_semantic_dedup", "threshold": args.threshold, "probes": args.probes}
    if args.recall_n:
        report["recall"] = recall(args.recall_n, args.dim, args.threshold, args.probes)
        print(json.dumps(report["recall"]), flush=True)
    report["sizes"] = []
    for n in args.sizes:
        report["sizes"].append(run_size(n, args.dim, args.threshold, args.probes))
        print(json.dumps(report["sizes"][-1]), flush=True)
    if len(report["sizes"]) >= 2:
        ns = [r["n"] for r in report["sizes"]]
        report["cpu_growth_exponent"] = round(float(np.polyfit(np.log(ns), np.log([r["cpu_s"] for r in report["sizes"]]), 1)[0]), 3)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k not in ("sizes",)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
