"""Scoring benchmarks (issue: scoring engine). Prints ratios measured in one run.

1. End-to-end CLIP scoring (the Ray engine: read tar, decode, preprocess, model, write Parquet)
   vs the model-only ceiling (same ViT-B-32-sized model with random weights, same batch size
   and torch threads, forward passes on pre-decoded tensors). Target >= 0.8.
2. Scaling from 1 to 2 workers (1 torch thread each) on 2 cores. Target >= 1.7x.
3. Peak memory vs amount of data: 10x more shards, peak RSS ratio < 1.2 (workers and driver).

    python benchmarks/bench_scoring.py [--samples 320] [--model ViT-B-32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def make_corpus(out: str, n: int, per_shard: int, seed: int = 0) -> list:
    from curation.engine import ShardTask
    from curation.shards import list_shards
    from curation.synth import DatasetSpec, SynthConfig, synthesize

    synthesize(out, SynthConfig(seed=seed, datasets=[DatasetSpec("bench", "pair", n, {}, per_shard)]))
    return [ShardTask(u, "bench", "pair") for u in list_shards(f"{out}/bench")]


def ceiling(tasks: list, model: str, batch: int, threads: int) -> tuple[float, int]:
    """Samples/s of the model alone on pre-decoded, pre-tokenized batches."""
    import torch

    from curation.shards import read_shard
    from scorers.clip import ClipScorer

    torch.set_num_threads(threads)
    scorer = ClipScorer(model, batch_size=batch)
    scorer.setup()
    prepared = []
    for t in tasks:
        samples = list(read_shard(t.url, kind="pair"))
        for i in range(0, len(samples), batch):
            prepared.append(scorer.prepare(samples[i: i + batch]))
    scorer.compute(prepared[0])  # warm-up
    n = sum(len(p.samples) for p in prepared)
    t0 = time.perf_counter()
    for p in prepared:
        scorer.compute(p)
    return n / (time.perf_counter() - t0), n


def engine_run(tasks: list, model: str, batch: int, workers: int, work: str) -> dict:
    from curation.engine import ScorerSpec, run_scoring

    spec = ScorerSpec("clip", {"model": model}, batch_size=batch, workers=workers, num_cpus=1)
    t0 = time.perf_counter()
    report = run_scoring(tasks, spec, work)
    wall = time.perf_counter() - t0
    rows = sum(s.rows for s in report.scored)
    assert not report.failed, report.failed
    return {"rows": rows, "wall_s": round(wall, 2), "samples_per_s": rows / wall,
            "worker_peak_rss_mb": max(s.peak_rss_mb or 0 for s in report.scored)}


def memory_arm(shards: int, per_shard: int) -> dict:
    """One arm of the memory benchmark, in its own process: (driver, worker) peak RSS."""
    import ray

    from curation.engine import ScorerSpec, run_scoring

    with tempfile.TemporaryDirectory() as d:
        tasks = make_corpus(f"{d}/c", shards * per_shard, per_shard, seed=1)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        spec = ScorerSpec("clip", {"model": "tiny-clip"}, batch_size=32, workers=2, num_cpus=1)
        report = run_scoring(tasks, spec, f"{d}/w")
        ray.shutdown()
    return {"shards": len(tasks), "rows": sum(s.rows for s in report.scored),
            "worker_peak_rss_mb": max(s.peak_rss_mb or 0 for s in report.scored),
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=320, help="pairs scored per throughput arm")
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip config (random weights)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--memory-shards", type=int, default=4, help="shards in the small memory arm (the large has 10x)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--memory-arm", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_arm:
        print(json.dumps(memory_arm(args.memory_arm, args.per_shard)))
        return

    import ray

    results: dict = {"model": args.model, "batch": args.batch, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tasks = make_corpus(f"{d}/corpus", args.samples, args.per_shard)
        ceil, n = ceiling(tasks, args.model, args.batch, threads=1)
        results["ceiling_1thread_samples_per_s"] = round(ceil, 2)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        one = engine_run(tasks, args.model, args.batch, 1, f"{d}/w1")
        two = engine_run(tasks, args.model, args.batch, 2, f"{d}/w2")
        ray.shutdown()
    results["engine_1worker"] = one
    results["engine_2workers"] = two
    results["e2e_vs_ceiling"] = round(one["samples_per_s"] / ceil, 3)
    results["scaling_2_vs_1"] = round(two["samples_per_s"] / one["samples_per_s"], 3)

    arms = []
    for shards in (args.memory_shards, args.memory_shards * 10):
        out = subprocess.run([sys.executable, __file__, "--memory-arm", str(shards), "--per-shard", str(args.per_shard)],
                             capture_output=True, text=True, check=True)
        arms.append(json.loads(out.stdout.strip().splitlines()[-1]))
    results["memory"] = arms
    results["memory_ratio_worker"] = round(arms[1]["worker_peak_rss_mb"] / arms[0]["worker_peak_rss_mb"], 3)
    results["memory_ratio_driver"] = round(arms[1]["driver_peak_rss_mb"] / arms[0]["driver_peak_rss_mb"], 3)

    print(f"model {args.model} (random weights), batch {args.batch}, {args.samples} pairs, {results['cpus']} CPUs")
    print(f"  model-only ceiling, 1 thread      : {ceil:8.2f} samples/s")
    print(f"  engine, 1 worker x 1 thread       : {one['samples_per_s']:8.2f} samples/s  (wall {one['wall_s']} s, incl. model load)")
    print(f"  engine, 2 workers x 1 thread      : {two['samples_per_s']:8.2f} samples/s  (wall {two['wall_s']} s)")
    print(f"  end-to-end / ceiling              : {results['e2e_vs_ceiling']:.3f}   (target >= 0.8)")
    print(f"  2 workers / 1 worker              : {results['scaling_2_vs_1']:.3f}   (target >= 1.7)")
    print(f"  peak RSS, {arms[0]['shards']} vs {arms[1]['shards']} shards: worker {arms[0]['worker_peak_rss_mb']:.0f} -> "
          f"{arms[1]['worker_peak_rss_mb']:.0f} MB (x{results['memory_ratio_worker']}), driver "
          f"{arms[0]['driver_peak_rss_mb']:.0f} -> {arms[1]['driver_peak_rss_mb']:.0f} MB (x{results['memory_ratio_driver']})  "
          f"(target < 1.2)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
