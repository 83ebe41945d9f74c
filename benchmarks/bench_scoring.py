"""Scoring benchmarks with a fair ceiling (issues: scoring engine, 22 item 4, 24). Ratios from one run.

Every arm runs in its own process, pinned (CPU affinity, inherited by the Ray processes it
starts) to the cores it is allowed, at the same priority, so no arm gets a core for free. The
throughput arms run --repeats rounds, alternating, and the best of each is kept (on a machine
shared with other work, the best is the least disturbed):

1. End to end vs the model-only ceiling, on the same cores (one core, one torch thread on a CPU):
   - ceiling: the same CLIP model (open_clip's own config, random weights: throughput needs no
     weights), batch size and threads, forward passes on batches decoded and tokenized beforehand;
   - end to end: the Ray engine with 1 worker on those cores (read tar, hash, decode, preprocess
     on --decode-workers threads, model, write Parquet).
   Throughput is taken over the worker's scoring window (first shard started to last shard
   finished), which leaves out the one-time actor start and model load exactly as the ceiling
   leaves out its own; rows / wall clock, start-up included, is printed too. Target >= 0.9.
2. Scaling on the wall clock: 2 workers on 2 cores vs 1 worker on 1 core, one torch thread each,
   each as total rows / (last shard's end - first shard's start) over all workers, with a shard
   count that is a multiple of the worker count. Target >= 1.8x.
3. The driver's reads: bytes the driver process read (``rchar`` in /proc/self/io: files, pipes
   and Ray's sockets) while it planned and ran a basic pass (2 workers) over 8 shards of 512 px
   JPEGs (~0.4 MB each; the throughput pool's images are too small to stand for a real pool's
   bytes), over the pool's bytes, after a run on one shard has paid the one-time reads (imports,
   Ray's first actor: ~2 MB whatever the pool). Target <= 1 %.
4. Decodes per image: basic + clip + deltaloss (tiny models) in one fused pass, with Pillow's
   decoder runs counted (``curation.common.counters``), against the three scored one at a time.
   Target <= 1.0.
5. Peak RSS, 4 vs 40 shards (tiny-clip, 2 workers), measured in the workers (``ru_maxrss`` as
   each shard ends) and in a driver process that only drives. Target: worker ratio < 1.1.

``--device cuda`` runs arms 1 and 2 on a GPU (every core, ``num_gpus: 1``, bf16 autocast,
``--decode gpu`` for nvJPEG decoding); scaling then needs 2 GPUs and is skipped on one.

    python benchmarks/bench_scoring.py [--samples 192] [--repeats 2] [--model ViT-B-32|ViT-L-14]
        [--device cpu|cuda] [--decode cpu|gpu] [--decode-workers N] [--json out.json]
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
# Ray runs its workers at nice 15 by default; on a machine shared with other work that gives the
# engine arms less CPU than the ceiling arm. Every arm runs at the same priority here.
os.environ.setdefault("RAY_worker_niceness", "0")


def make_corpus(out: str, n: int, per_shard: int, seed: int = 0) -> None:
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize

    synthesize(out, SynthConfig(seed=seed, datasets=[DatasetSpec("bench", "pair", n, {}, per_shard)]))


def _tasks(corpus: str) -> list:
    from curation.scoring.engine import ShardTask
    from curation.data.shards import list_shards

    return [ShardTask(u, "bench", "pair") for u in list_shards(f"{corpus}/bench")]


def _clip_params(model: str, batch: int, device: str, decode: str = "cpu") -> dict:
    return {"model": model, "batch_size": batch, "device": device, "decode": decode}


def ceiling_arm(corpus: str, model: str, batch: int, threads: int, device: str = "cpu") -> dict:
    """Samples/s of the model alone on batches prepared beforehand (on the device already)."""
    import torch

    from curation.data.shards import read_shard
    from scorers.clip import ClipScorer

    torch.set_num_threads(threads)
    scorer = ClipScorer(**_clip_params(model, batch, device))
    scorer.setup()
    prepared = []
    for t in _tasks(corpus):
        samples = list(read_shard(t.url, kind="pair"))
        for i in range(0, len(samples), batch):
            prepared.append(scorer.prepare(samples[i: i + batch]))
    for p in prepared:
        p.payload = (p.payload[0].to(device), p.payload[1])
    scorer.compute(prepared[0])  # warm-up, as the engine's first batch is its own
    n = sum(len(p.samples) for p in prepared)
    _sync(device)
    t0 = time.perf_counter()
    for p in prepared:
        scorer.compute(p)
    _sync(device)
    return {"samples": n, "samples_per_s": n / (time.perf_counter() - t0)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def engine_arm(corpus: str, model: str, batch: int, workers: int, work: str, device: str = "cpu",
               decode: str = "cpu", decode_workers: int = 1) -> dict:
    import ray

    import curation.scoring.workers  # noqa: F401 - imported before the driver's reads are counted
    from curation.common.counters import read_bytes_so_far
    from curation.scoring.engine import ScorerSpec, run_scoring

    cores = len(os.sched_getaffinity(0))
    gpu = device.startswith("cuda")
    ray.init(num_cpus=cores if gpu else workers, num_gpus=workers if gpu else 0, include_dashboard=False,
             log_to_driver=False)
    spec = ScorerSpec("clip", _clip_params(model, batch, device, decode), batch_size=batch, workers=workers,
                      num_cpus=cores // workers if gpu else 1, num_gpus=1 if gpu else 0, decode_workers=decode_workers)
    tasks = _tasks(corpus)
    pool = sum(os.path.getsize(t.url) for t in tasks)
    io0 = read_bytes_so_far()
    t0 = time.perf_counter()
    report = run_scoring(tasks, spec, work)
    wall = time.perf_counter() - t0
    driver_read = read_bytes_so_far()["rchar"] - io0["rchar"]
    ray.shutdown()
    assert not report.failed, report.failed
    windows: dict[int, list] = {}
    for s in report.scored:
        w = windows.setdefault(s.pid, [s.started_at, s.started_at + s.seconds, 0])
        w[0], w[1], w[2] = min(w[0], s.started_at), max(w[1], s.started_at + s.seconds), w[2] + s.rows
    rows = sum(s.rows for s in report.scored)
    first, last = min(w[0] for w in windows.values()), max(w[1] for w in windows.values())
    return {"rows": rows, "shards": len(tasks), "wall_s": round(wall, 2), "wall_samples_per_s": rows / wall,
            "workers_seen": len(windows), "samples_per_s": rows / (last - first),  # the wall clock of scoring
            "driver_read_bytes": driver_read, "pool_bytes": pool}


def driver_arm(work: str, shards: int = 8, per_shard: int = 24) -> dict:
    """The driver's reads while it plans and runs a basic pass over web-sized JPEGs (512 px, ~0.4
    MB each), after a run on one shard has paid its one-time reads (imports, Ray's first actor)."""
    import io

    import numpy as np
    import ray
    from PIL import Image

    from curation.common.counters import read_bytes_so_far
    from curation.data.shards import list_shards
    from curation.data.writer import ShardWriter
    from curation.scoring.engine import ScorerSpec, ShardTask, run_scoring

    rng = np.random.default_rng(0)
    with ShardWriter(f"{work}/pool/bench", max_samples=per_shard) as w:
        for i in range(shards * per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            w.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": b"noise"})
    tasks = [ShardTask(u, "bench", "pair") for u in list_shards(f"{work}/pool/bench")]
    pool = sum(os.path.getsize(t.url) for t in tasks)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_scoring(tasks[:1], ScorerSpec("basic"), f"{work}/warm")
    io0 = read_bytes_so_far()
    report = run_scoring(tasks, ScorerSpec("basic", workers=2), f"{work}/w")
    io1 = read_bytes_so_far()
    ray.shutdown()
    assert len(report.scored) == len(tasks), report.failed
    read = io1["rchar"] - io0["rchar"]
    return {"driver_read_bytes": read, "pool_bytes": pool, "driver_read_fraction": read / pool,
            "driver_read_bytes_per_shard": read / len(tasks), "driver_storage_read_bytes": io1["read_bytes"] - io0["read_bytes"]}


def decodes_arm(corpus: str, work: str) -> dict:
    """Pillow decoder runs per image: basic + clip + deltaloss fused, and one scorer at a time."""
    from curation.common.counters import count_decodes
    from curation.scoring.engine import ScorerSpec, score_local_pass

    models = _tiny_deltaloss_models(f"{work}/models")
    specs = [ScorerSpec("basic", batch_size=32), ScorerSpec("clip", {"model": "tiny-clip"}, batch_size=32),
             ScorerSpec("deltaloss", {"small": models[0], "large": models[1]}, batch_size=32)]
    tasks = _tasks(corpus)
    with count_decodes() as fused:
        reports = score_local_pass(tasks, specs, f"{work}/fused")
    with count_decodes() as alone:
        for spec in specs:
            score_local_pass(tasks, [spec], f"{work}/alone")
    images = sum(s.rows for s in reports[0].scored)
    return {"images": images, "decodes_fused": fused.n, "decodes_one_at_a_time": alone.n,
            "decodes_per_image": fused.n / images, "decodes_per_image_one_at_a_time": alone.n / images,
            **_video_decodes(specs, work)}


def _video_decodes(specs: list, work: str) -> dict:
    """PyAV opens per clip in one fused pass (24 synthetic clips): basic + deltaloss use the frames
    verification kept; the clip scorer still decodes each clip itself (``scorers/clip.py``)."""
    from curation.common.counters import count_decodes
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from curation.data.shards import list_shards
    from curation.scoring.engine import ShardTask, score_local_pass

    synthesize(f"{work}/clips", SynthConfig(seed=1, datasets=[DatasetSpec("clips", "video", 24, {}, 12)]))
    tasks = [ShardTask(u, "clips", "video") for u in list_shards(f"{work}/clips/clips")]
    out = {}
    for label, names in (("basic_deltaloss", ("basic", "deltaloss")), ("basic_clip_deltaloss", ("basic", "clip", "deltaloss"))):
        with count_decodes() as c:
            reports = score_local_pass(tasks, [s for s in specs if s.name in names], f"{work}/clips-{label}")
        clips = sum(r.rows for r in reports[0].scored)
        out[f"decodes_per_video_{label}"] = c.videos / clips
    return out


def _tiny_deltaloss_models(root: str) -> tuple[str, str]:
    """Two tiny NVILAs (random weights) saved as a user's would be: DeltaLoss's image path."""
    from model import NVILAConfig, NVILAForCausalLM
    from model.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a red circle on a blue background", "Describe the image."] * 10, vocab_size=300)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    lc = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)
    out = []
    for name in ("small", "large"):
        m = NVILAForCausalLM(NVILAConfig(vision_config=vc, llm_config=lc, image_mode="resize"))
        m.attach_tokenizer(tok)
        m.save_pretrained(f"{root}/{name}", tok)
        out.append(f"{root}/{name}")
    return out[0], out[1]


def memory_arm(corpus: str, work: str) -> dict:
    """Drive a scoring run and nothing else: worker and driver peak RSS."""
    import ray

    from curation.scoring.engine import ScorerSpec, run_scoring

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    report = run_scoring(_tasks(corpus), ScorerSpec("clip", {"model": "tiny-clip"}, batch_size=32, workers=2,
                                                    num_cpus=1), work)
    ray.shutdown()
    assert not report.failed, report.failed
    return {"shards": len(report.scored), "rows": sum(s.rows for s in report.scored),
            "worker_peak_rss_mb": max(s.peak_rss_mb or 0 for s in report.scored),
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _arm(name: str, cores: list[int], *args: str) -> dict:
    """Run one arm in a fresh process pinned to ``cores``; its JSON result."""
    cmd = [sys.executable, __file__, "--arm", name, "--cores", ",".join(map(str, cores)), *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"arm {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_arm(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})  # Ray's processes inherit it
    threads = len(os.sched_getaffinity(0)) if args.device.startswith("cuda") else 1
    if args.arm == "ceiling":
        res = ceiling_arm(args.corpus, args.model, args.batch, threads, args.device)
    elif args.arm.startswith("engine"):
        res = engine_arm(args.corpus, args.model, args.batch, int(args.arm[len("engine"):]), args.work, args.device,
                         args.decode, args.decode_workers)
    elif args.arm == "decodes":
        res = decodes_arm(args.corpus, args.work)
    elif args.arm == "driver":
        res = driver_arm(args.work)
    else:
        res = memory_arm(args.corpus, args.work)
    print(json.dumps(res))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=192, help="pairs scored per throughput arm")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the throughput arms")
    ap.add_argument("--per-shard", type=int, default=24, help="the shard count must be a multiple of 2 (the workers)")
    ap.add_argument("--model", default="ViT-B-32", help="open_clip config, random weights (ViT-B-32, ViT-L-14, ...)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (arms 1-2 on a GPU)")
    ap.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="gpu: batched decode_jpeg on the device")
    ap.add_argument("--decode-workers", type=int, default=1, help="decode threads per scoring worker")
    ap.add_argument("--memory-shards", type=int, default=4, help="shards in the small memory arm (the large has 10x)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the RSS arm (5)")
    ap.add_argument("--json", help="also write the results here")
    for hidden in ("--arm", "--cores", "--corpus", "--work"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    return ap


def _throughput(args: argparse.Namespace, d: str, cores: list[int]) -> dict:
    """Arms 1-3, alternating over --repeats rounds; the best round of each."""
    gpu = args.device.startswith("cuda")
    common = ["--corpus", f"{d}/corpus", "--model", args.model, "--batch", str(args.batch), "--device", args.device,
              "--decode", args.decode, "--decode-workers", str(args.decode_workers)]
    one = cores if gpu else cores[:1]
    scale = not gpu or _gpus() >= 2
    rounds: dict[str, list[dict]] = {"ceiling": [], "engine1": [], "engine2": []}
    for r in range(args.repeats):
        rounds["ceiling"].append(_arm("ceiling", one, *common))
        rounds["engine1"].append(_arm("engine1", one, "--work", f"{d}/w1-{r}", *common))
        if scale:
            rounds["engine2"].append(_arm("engine2", cores if gpu else cores[:2], "--work", f"{d}/w2-{r}", *common))
    best = {k: max(v, key=lambda x: x["samples_per_s"]) for k, v in rounds.items() if v}
    out = {"rounds_samples_per_s": {k: [round(x["samples_per_s"], 2) for x in v] for k, v in rounds.items()},
           "ceiling": best["ceiling"], "engine_1worker": best["engine1"], "engine_2workers": best.get("engine2")}
    out["end_to_end_vs_ceiling"] = round(best["engine1"]["samples_per_s"] / best["ceiling"]["samples_per_s"], 3)
    out["end_to_end_wall_vs_ceiling"] = round(best["engine1"]["wall_samples_per_s"] / best["ceiling"]["samples_per_s"], 3)
    out["scale_2_vs_1"] = round(best["engine2"]["samples_per_s"] / best["engine1"]["samples_per_s"], 3) if scale else None
    return out


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main() -> None:
    args = _parser().parse_args()
    if args.arm:
        _run_arm(args)
        return
    cores = sorted(os.sched_getaffinity(0))
    shards = -(-args.samples // args.per_shard)
    if not args.device.startswith("cuda") and len(cores) < 2:
        sys.exit("the scaling arm needs 2 cores")
    if shards % 2:
        sys.exit(f"{shards} shards: the scaling arm needs a shard count that is a multiple of 2 (--samples, --per-shard)")
    results: dict = {"model": args.model, "batch": args.batch, "cpus": len(cores), "device": args.device,
                     "decode": args.decode, "decode_workers": args.decode_workers, "samples": args.samples, "shards": shards}
    with tempfile.TemporaryDirectory() as d:
        make_corpus(f"{d}/corpus", args.samples, args.per_shard)
        results.update(_throughput(args, d, cores))
        results.update(_arm("decodes", cores, "--corpus", f"{d}/corpus", "--work", f"{d}/dec"))
        results.update(_arm("driver", cores, "--work", f"{d}/driver"))
        arms = []
        for n in () if args.skip_memory else (args.memory_shards, args.memory_shards * 10):
            make_corpus(f"{d}/m{n}", n * args.per_shard, args.per_shard, seed=1)
            arms.append(_arm("memory", cores, "--corpus", f"{d}/m{n}", "--work", f"{d}/mw{n}"))
    results["memory"] = arms
    if arms:
        results["worker_rss_ratio"] = round(arms[1]["worker_peak_rss_mb"] / arms[0]["worker_peak_rss_mb"], 3)
        results["driver_rss_ratio"] = round(arms[1]["driver_peak_rss_mb"] / arms[0]["driver_peak_rss_mb"], 3)
    cpu_b32 = args.model == "ViT-B-32" and args.device == "cpu"
    results["vit_b32_end_to_end_vs_ceiling"] = results["end_to_end_vs_ceiling"] if cpu_b32 else None
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _print(r: dict) -> None:
    ceil, one, two = r["ceiling"], r["engine_1worker"], r["engine_2workers"]
    print(f"model {r['model']} (random weights) on {r['device']}, batch {r['batch']}, {r['samples']} pairs in "
          f"{r['shards']} shards, {r['cpus']} cores, decode {r['decode']} x{r['decode_workers']} threads; "
          f"rounds {r['rounds_samples_per_s']}")
    print(f"  model-only ceiling                     : {ceil['samples_per_s']:8.2f} samples/s")
    print(f"  engine, 1 worker on the same cores     : {one['samples_per_s']:8.2f} samples/s while scoring "
          f"({one['wall_samples_per_s']:.2f}/s over {one['wall_s']} s wall, actor start and model load included)")
    print(f"  end-to-end / ceiling                   : {r['end_to_end_vs_ceiling']:.3f}   (target >= 0.9; "
          f"{r['end_to_end_wall_vs_ceiling']:.3f} with start-up)")
    if two:
        print(f"  engine, 2 workers                      : {two['samples_per_s']:8.2f} samples/s, wall clock of scoring "
              f"(first start to last end); 2 / 1 = {r['scale_2_vs_1']:.3f}   (target >= 1.8)")
    print(f"  driver reads / pool bytes              : {r['driver_read_fraction']:.5f}   (target <= 0.01; "
          f"{r['driver_read_bytes']} of {r['pool_bytes']} bytes, {r['driver_read_bytes_per_shard']:.0f} per shard)")
    print(f"  decodes per image, basic+clip+deltaloss: {r['decodes_per_image']:.3f} fused, "
          f"{r['decodes_per_image_one_at_a_time']:.3f} one scorer at a time   (target <= 1.0)")
    print(f"  decodes per clip, fused: basic+deltaloss {r['decodes_per_video_basic_deltaloss']:.3f}, "
          f"basic+clip+deltaloss {r['decodes_per_video_basic_clip_deltaloss']:.3f}")
    for name in ("worker", "driver"):
        if f"{name}_rss_ratio" in r:
            small, large = r["memory"]
            print(f"  peak RSS, {small['shards']} vs {large['shards']} shards, {name:6s}: "
                  f"{small[f'{name}_peak_rss_mb']:.0f} -> {large[f'{name}_peak_rss_mb']:.0f} MB (x{r[f'{name}_rss_ratio']})")


if __name__ == "__main__":
    main()
