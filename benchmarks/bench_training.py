"""Training-loop throughput vs the model alone (issue: training from manifests).

Builds a synthetic corpus, curates it into a manifest, and a small NVILA; then measures in one
run, on the same machine and the same stage settings:

- the training loop: streaming curated shards, decoding, tiling, tokenizing, mixing, batching
  (on a prefetch thread) and the step (forward, backward, AdamW);
- the ceiling: the same model's forward + backward + AdamW on the same number of pre-built
  batches held in memory.

Target: loop samples/s >= 0.9 x ceiling (the loader must not be the bottleneck).

    python benchmarks/bench_training.py [--steps 30] [--batch 8] [--size small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def curated_stage(d: str, size: str, steps: int, batch: int) -> tuple:
    """A scored, curated pair corpus and a tiny NVILA: (manifest, manifest url, init dir, stage plan)."""
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from curation.data.shards import dataset_of, list_shards
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local
    from curation.selection.curate import curate
    from training_hooks.bootstrap import init_tiny_model
    from training_hooks.recipe import StagePlan

    synthesize(f"{d}/c", SynthConfig(seed=0, datasets=[DatasetSpec("pairs", "pair", 1500, {}, 300)]))
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(f"{d}/c/pairs")]
    score_local(tasks, ScorerSpec("basic"), f"{d}/w")
    manifest, url = curate(f"{d}/w", {"stages": {"image_sft": {"pairs": 1.0}}}, f"{d}/cur", use_ray=False)
    init = init_tiny_model(manifest, f"{d}/init", size=size)
    plan = StagePlan(name="image_sft", train=["vision_tower", "projector", "llm"], lr=1e-4, steps=steps + 3,
                     batch_size=batch, max_length=512, save_every=10 ** 6, datasets={"pairs": 1.0})
    return manifest, url, init, plan


def loop_rate(d: str, url: str, init: str, plan, batch: int) -> tuple[float, list[dict]]:
    """Samples/s of the real stage loop (warm-up steps left out), and its per-step metrics."""
    from training_hooks.trainer import run_stage

    res = run_stage({"plan": plan.model_dump(), "stage_dir": f"{d}/stage", "init_dir": init, "manifest": url, "seed": 0})
    m = res["metrics"][3:]
    return len(m) * batch / sum(batch / x["samples_per_s"] for x in m), m


def ceiling_rate(manifest, init: str, plan, steps: int, batch: int) -> float:
    """Samples/s of forward + backward + AdamW on the same model with batches built beforehand."""
    from model import NVILAForCausalLM
    from model.examples import ExampleBuilder
    from model.nvila import load_tokenizer
    from training_hooks.data import batches, example_stream, stage_sources
    from training_hooks.trainer import freeze_for

    model = NVILAForCausalLM.from_pretrained(init)
    tok = load_tokenizer(init)
    freeze_for(model, plan.train)
    builder = ExampleBuilder(model, tok, plan.max_length)
    prebuilt = []
    for b in batches(example_stream(stage_sources(manifest, plan.datasets), builder, 0), batch, tok.pad_token_id,
                     plan.max_length):
        b.pop("position"), b.pop("llm_tokens")
        prebuilt.append(b)
        if len(prebuilt) == steps + 3:
            break
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    model.train()
    for b in prebuilt:
        t0 = time.perf_counter()
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return batch * (len(times) - 3) / sum(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        manifest, url, init, plan = curated_stage(d, args.size, args.steps, args.batch)
        loop_sps, m = loop_rate(d, url, init, plan, args.batch)
        ceil_sps = ceiling_rate(manifest, init, plan, args.steps, args.batch)
    ratio = loop_sps / ceil_sps
    result = {"size": args.size, "batch": args.batch, "steps": args.steps, "loop_samples_per_s": round(loop_sps, 2),
              "ceiling_samples_per_s": round(ceil_sps, 2), "ratio": round(ratio, 3),
              "loop_tokens_per_s": round(sum(x["tokens_per_s"] for x in m) / len(m), 1)}
    print(f"{args.size} NVILA, batch {args.batch}, {args.steps} timed steps, image_sft (all modules), 2 threads")
    print(f"  training loop (stream, decode, tokenize, step): {loop_sps:7.2f} samples/s  ({result['loop_tokens_per_s']} tokens/s)")
    print(f"  forward+backward+AdamW on pre-built batches : {ceil_sps:7.2f} samples/s")
    print(f"  ratio                                        : {ratio:.3f}   (target >= 0.9)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
