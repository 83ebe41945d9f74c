"""Resharding throughput vs a plain copy of the same bytes (issue: selection & resharding).

Writes a corpus of shards whose members have realistic sizes (JPEG-sized random payloads,
captions, img2dataset JSON), then measures in one run, on the same files:

- plain copy: read each input shard and write it to a new file (1 MiB chunks, no parsing),
  without and with an fsync per file (the resharder makes every shard durable);
- reshard: stream the tars, pick the kept samples, copy their members byte for byte into
  new shards of --max-samples (md5 and stats included), keeping --keep of the samples.

- reshard in one process, and on Ray with 2 workers.

Target: reshard MB/s (of input read) >= 0.7 x copy MB/s. Each arm runs --repeats times
alternately; the best of each is reported (page cache warm for all).

    python benchmarks/bench_reshard.py [--samples 20000] [--keep 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def make_inputs(root: str, samples: int, per_shard: int, seed: int = 0) -> list:
    from curation.reshard import InputShard
    from curation.shards import file_checksum
    from curation.writer import ShardWriter

    rng = np.random.default_rng(seed)
    keys: dict[int, list[str]] = {}
    with ShardWriter(f"{root}/in/bench", max_samples=per_shard) as w:
        for i in range(samples):
            key = f"{i:09d}"
            size = int(rng.lognormal(np.log(40_000), 0.6))
            w.write({"__key__": key, "jpg": rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
                     "txt": f"caption number {i}".encode(), "json": json.dumps({"key": key, "w": 256}).encode()})
            keys.setdefault(i // per_shard, []).append(key)
    return [InputShard("bench", os.path.basename(s.url)[:-4], s.url, file_checksum(s.url)[1], keys[j])
            for j, s in enumerate(w.written)]


def plain_copy(inputs: list, out: str, fsync: bool) -> float:
    """cp of every input shard; with ``fsync`` each file is made durable, as the resharder's are."""
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    for inp in inputs:
        with open(inp.url, "rb") as src, open(os.path.join(out, os.path.basename(inp.url)), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            if fsync:
                dst.flush()
                os.fsync(dst.fileno())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--max-samples", type=int, default=1000, help="samples per output shard")
    ap.add_argument("--keep", type=float, default=1.0, help="fraction of samples kept")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    from curation.reshard import ReshardConfig, reshard

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        inputs = make_inputs(root, args.samples, args.per_shard)
        rng = np.random.default_rng(1)
        for inp in inputs:
            inp.kept = [k for k in inp.kept if rng.random() < args.keep]
        total = sum(os.path.getsize(i.url) for i in inputs)
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        times: dict[str, list[float]] = {"copy": [], "copy_fsync": [], "reshard_1": [], "reshard_ray2": []}
        for r in range(args.repeats):
            for fsync, name in ((False, "copy"), (True, "copy_fsync")):
                times[name].append(plain_copy(inputs, f"{root}/{name}{r}", fsync))
                shutil.rmtree(f"{root}/{name}{r}")
            for use_ray, name in ((False, "reshard_1"), (True, "reshard_ray2")):
                t0 = time.perf_counter()
                res = reshard(inputs, f"{root}/{name}{r}", ReshardConfig(max_samples=args.max_samples, workers=2,
                                                                          group_samples=args.max_samples * 2),
                              use_ray=use_ray, check_inputs=False)
                times[name].append(time.perf_counter() - t0)
                kept = sum(d["samples"] for d in res.datasets.values())
                shutil.rmtree(f"{root}/{name}{r}")
        ray.shutdown()
    rate = {k: total / 1e6 / min(v) for k, v in times.items()}
    result = {"input_mb": round(total / 1e6, 1), "samples": args.samples, "kept": kept,
              "mb_per_s": {k: round(v, 1) for k, v in rate.items()},
              "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}}
    for r in ("reshard_1", "reshard_ray2"):
        for c in ("copy", "copy_fsync"):
            result[f"{r}/{c}"] = round(rate[r] / rate[c], 3)
    print(f"{args.samples} samples, {total / 1e6:.0f} MB in {len(inputs)} shards, keeping {kept}; best of {args.repeats}")
    print(f"  plain copy (cp, page cache)        : {rate['copy']:8.1f} MB/s")
    print(f"  plain copy + fsync per file        : {rate['copy_fsync']:8.1f} MB/s")
    print(f"  reshard, one process               : {rate['reshard_1']:8.1f} MB/s of input (md5 + stats + fsync included)")
    print(f"  reshard, Ray, 2 workers            : {rate['reshard_ray2']:8.1f} MB/s of input")
    for r in ("reshard_1", "reshard_ray2"):
        print(f"  {r:<13} / copy: {result[r + '/copy']:.3f}   / copy+fsync: {result[r + '/copy_fsync']:.3f}   (target >= 0.7)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
