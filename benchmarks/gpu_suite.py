"""One command for a GPU (issue 24): scoring and training figures, JSON out, under 8 minutes.

    python benchmarks/gpu_suite.py --json gpu.json          # on a machine with one CUDA GPU
    python benchmarks/gpu_suite.py --smoke --json smoke.json  # tiny sizes on the CPU (CI: the script cannot rot)

What it measures (each arm in this process, one after the other):

1. CLIP (open_clip's own ``ViT-B-32`` and ``ViT-L-14`` configs, random weights: throughput
   needs no weights), on pairs whose JPEGs are web-sized (320-640 px a side):
   - ``model_only_img_s``: forward passes on batches decoded, resized and moved to the device
     beforehand (the ceiling);
   - ``end_to_end_img_s``: the scoring engine's fused pass (``score_local_pass``: the code each
     Ray actor runs: read the tar, hash it, decode on ``--decode-workers`` threads, preprocess,
     model under bf16 autocast, write Parquet), over the scoring window (model load excluded,
     as the ceiling excludes its own), once with CPU decoding and once with ``decode: gpu``
     (batched nvJPEG ``decode_jpeg`` on the device, Pillow fallback);
   - ``end_to_end_vs_model_only`` for each.
2. DeltaLoss: samples/s of the fused pass with a small and a large NVILA (random weights; the
   large one's LLM at the Qwen2-0.5B config below) on the device, under the scorer's
   ``precision`` (bf16 autocast on CUDA, fp32 on the CPU).
3. An NVILA training step (LLM at Qwen2-0.5B's config: hidden 896, 24 layers, 14 heads, 2 KV
   heads, MLP 4864, vocab 151936; a SigLIP-B-sized tower at 448 px), bf16 autocast vs torchao
   float8 (tensorwise), both ``torch.compile``d: tokens/s and peak memory at an equal batch, and
   the largest batch that fits (doubling until out of memory, within --max-batch-seconds).
   float8 needs compute capability >= 8.9; elsewhere its arm says why it was skipped.

``--smoke`` runs every arm at tiny sizes on the CPU (tiny-clip, a 2-layer NVILA, float8 in
emulation, nothing compiled), so that a test can run the whole script in seconds.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, vocab_size=151936)
SIGLIP_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=448,
                patch_size=14)
TINY_LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=512, tie_word_embeddings=True)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=8)


def make_pool(out: str, n: int, per_shard: int, sizes: tuple[int, int], seed: int = 0) -> list:
    """Pairs with JPEGs of web sizes (smooth colour fields with grain, quality 90)."""
    import numpy as np
    from PIL import Image

    from curation.data.shards import list_shards
    from curation.data.writer import ShardWriter
    from curation.scoring.engine import ShardTask

    rng = np.random.default_rng(seed)
    with ShardWriter(f"{out}/pairs", max_samples=per_shard) as w:
        for i in range(n):
            h, wd = (int(x) for x in rng.integers(sizes[0], sizes[1] + 1, 2))
            base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
            im = np.asarray(Image.fromarray(base).resize((wd, h), Image.BILINEAR), dtype=np.int16)
            im = np.clip(im + rng.integers(-12, 13, im.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=90)
            w.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "txt": b"a photo of a coloured field"})
    return [ShardTask(u, "pairs", "pair") for u in list_shards(f"{out}/pairs")]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _window_rate(reports: list) -> float:
    """Rows / (last shard end - first shard start) of a pass: the scoring window."""
    done = [s for s in reports[0].scored]
    first, last = min(s.started_at for s in done), max(s.started_at + s.seconds for s in done)
    return sum(s.rows for s in done) / (last - first)


def clip_model_only(model: str, tasks: list, device: str, batch: int, limit: int) -> float:
    from curation.data.shards import read_shard
    from scorers.clip import ClipScorer

    sc = ClipScorer(model, device=device, batch_size=batch)
    sc.setup()
    samples = [s for t in tasks for s in read_shard(t.url, kind="pair")][:limit]
    prepared = [sc.prepare(samples[i: i + batch]) for i in range(0, len(samples), batch)]
    for p in prepared:
        p.payload = (p.payload[0].to(device), p.payload[1])
    sc.compute(prepared[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for p in prepared:
        sc.compute(p)
    _sync(device)
    return len(samples) / (time.perf_counter() - t0)


def clip_end_to_end(model: str, tasks: list, device: str, batch: int, decode: str, decode_workers: int, work: str) -> float:
    from curation.scoring.engine import ScorerSpec, score_local_pass

    spec = ScorerSpec("clip", {"model": model, "device": device, "batch_size": batch, "decode": decode},
                      batch_size=batch, decode_workers=decode_workers, prefetch=max(2, decode_workers))
    if device.startswith("cuda"):
        score_local_pass(tasks[:1], [spec], f"{work}/warm")  # cuDNN / nvJPEG warm-up out of the window
    reports = score_local_pass(tasks, [spec], work)
    assert not reports[0].failed, reports[0].failed
    return _window_rate(reports)


def clip_arms(args: argparse.Namespace, tasks: list, device: str, d: str) -> dict:
    out = {}
    for model in args.clip_models:
        r = {"model_only_img_s": round(clip_model_only(model, tasks, device, args.batch, args.model_only_samples), 1)}
        for decode in ("cpu", "gpu"):
            rate = clip_end_to_end(model, tasks, device, args.batch, decode, args.decode_workers, f"{d}/{model}-{decode}")
            r[f"end_to_end_{decode}_decode_img_s"] = round(rate, 1)
            r[f"end_to_end_{decode}_decode_vs_model_only"] = round(rate / r["model_only_img_s"], 3)
        out[model] = r
    return out


def _nvila(llm: dict, vision: dict, seed: int = 0):
    import torch

    from model import NVILAConfig, NVILAForCausalLM
    from model.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a photo of a coloured field", "Describe the image."] * 10, vocab_size=300)
    torch.manual_seed(seed)
    m = NVILAForCausalLM(NVILAConfig(vision_config=vision, llm_config={"vocab_size": len(tok), **llm},
                                     image_mode="resize"))
    m.attach_tokenizer(tok)
    return m, tok


def deltaloss_arm(args: argparse.Namespace, tasks: list, device: str, d: str) -> dict:
    from curation.scoring.engine import ScorerSpec, score_local_pass

    paths = []
    for name, llm in (("small", TINY_LLM), ("large", TINY_LLM if args.smoke else QWEN2_05B)):
        m, tok = _nvila({k: v for k, v in llm.items() if k != "vocab_size"}, TINY_VISION if args.smoke else SIGLIP_B)
        m.save_pretrained(f"{d}/{name}", tok)
        paths.append(f"{d}/{name}")
    precision = "bf16" if device.startswith("cuda") else "fp32"  # the scorer's own default (auto) on each device
    spec = ScorerSpec("deltaloss", {"small": paths[0], "large": paths[1], "device": device, "batch_size": args.batch,
                                    "precision": precision},
                      batch_size=args.batch, decode_workers=args.decode_workers)
    reports = score_local_pass(tasks[: args.deltaloss_shards], [spec], f"{d}/work")
    assert not reports[0].failed, reports[0].failed
    return {"samples_per_s": round(_window_rate(reports), 2), "large_llm": "tiny" if args.smoke else "Qwen2-0.5B config",
            "precision": precision}


def _train_rate(m, tok, batch: int, steps: int, device: str, compile_: bool) -> dict:
    import torch

    from benchmarks.bench_fp8 import batches, step_rate

    data = batches(m, tok, 2, batch)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tps, sps = step_rate(m, data, steps, "cuda" if device.startswith("cuda") else "cpu", bf16=device.startswith("cuda"),
                         compile_=compile_)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"batch": batch, "tokens_per_s": round(tps, 1), "steps_per_s": round(sps, 3),
            "peak_mem_mb": round(peak, 1) if peak is not None else None}


def _largest_batch(make, start: int, args: argparse.Namespace, device: str) -> dict:
    """Double the batch until out of memory (or out of the time budget); the last that ran."""
    import torch

    if args.max_batch_seconds <= 0:
        return {"skipped": "no time budget (--max-batch-seconds 0)"}
    best, b, t0 = None, start, time.time()
    while time.time() - t0 < args.max_batch_seconds:
        try:
            best = _train_rate(*make(), b, 2, device, not args.smoke)
        except torch.OutOfMemoryError:
            break
        b *= 2
    else:
        if best is not None:
            best["stopped_by_time_budget"] = True
    return best or {"skipped": f"batch {start} does not fit"}


def train_arms(args: argparse.Namespace, device: str) -> dict:
    from model.fp8 import convert_to_fp8, fp8_hardware

    llm, vision = (TINY_LLM, TINY_VISION) if args.smoke else ({k: v for k, v in QWEN2_05B.items() if k != "vocab_size"},
                                                             SIGLIP_B)
    base, tok = _nvila(llm, vision)
    if not args.smoke:  # Qwen2-0.5B's vocabulary: the embedding and LM head at their real size
        base, tok = _nvila({**llm, "vocab_size": QWEN2_05B["vocab_size"]}, vision)
    has, why = fp8_hardware()
    emulate = not device.startswith("cuda")
    out: dict = {"llm": "tiny" if args.smoke else "Qwen2-0.5B config", "compiled": not args.smoke, "fp8_hardware": why,
                 "reference": "bf16 autocast" if not emulate else "fp32 (CPU)", "float8": "emulated" if emulate else "torchao"}

    def make(fp8: bool):
        def build():
            m = copy.deepcopy(base)
            if fp8:
                convert_to_fp8(m, "tensorwise", emulate=emulate)
            return m.to(device), tok
        return build

    for name, fp8 in (("bf16", False), ("float8_tensorwise", True)):
        if fp8 and not emulate and not has:
            out[name] = {"skipped": why}
            continue
        out[name] = {"equal_batch": _train_rate(*make(fp8)(), args.train_batch, args.train_steps, device, not args.smoke)}
        out[name]["largest_batch"] = _largest_batch(make(fp8), args.train_batch, args, device)
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    ap.add_argument("--samples", type=int, default=4096, help="pairs in the CLIP pool")
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256, help="CLIP and DeltaLoss batch")
    ap.add_argument("--decode-workers", type=int, default=8)
    ap.add_argument("--model-only-samples", type=int, default=2048)
    ap.add_argument("--deltaloss-shards", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--max-batch-seconds", type=float, default=90, help="time budget of each largest-batch search")
    ap.add_argument("--json", help="also write the results here")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    import torch

    if args.smoke:
        args.samples, args.per_shard, args.batch, args.decode_workers = 16, 8, 8, 2
        args.model_only_samples, args.deltaloss_shards, args.train_batch, args.train_steps = 16, 1, 2, 2
        args.max_batch_seconds = 0  # the equal-batch arm only
        args.clip_models = ["tiny-clip"]
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke for the CPU check")
        args.clip_models = ["ViT-B-32", "ViT-L-14"]
        device = "cuda"
    t0 = time.time()
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": args.smoke,
                     "samples": args.samples, "decode_workers": args.decode_workers, "cpus": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as d:
        tasks = make_pool(f"{d}/pool", args.samples, args.per_shard, (24, 48) if args.smoke else (320, 640))
        results["clip"] = clip_arms(args, tasks, device, d)
        results["deltaloss"] = deltaloss_arm(args, tasks, device, f"{d}/dl")
    results["training"] = train_arms(args, device)
    results["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
