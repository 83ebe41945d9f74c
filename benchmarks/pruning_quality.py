"""Pruning quality, like NVILA's Table 3, on a synthetic corpus with known noise.

One noisy pool of image-text pairs; a trusted clean seed set (trains the DFN filter and the
DeltaLoss proxies); a clean held-out set. Five selections of the pool, each curated into its
own manifest, and the same tiny NVILA trained from the same initialization with the same
step budget on each:

  (a) all data            (b) random 50 %          (c) CLIP top 50 %
  (d) DeltaLoss top 50 %  (e) CLIP filter (>= threshold), then DeltaLoss to 50 % of the pool

Reported per arm: samples kept, the share of injected noise that survived selection, and the
loss on the clean held-out set after training (lower is better).

    python benchmarks/pruning_quality.py [--pool 1200] [--steps 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def heldout_loss(model_dir: str, shards: list[str], max_samples: int = 200) -> float:
    from model import NVILAForCausalLM
    from model.conversation import collate
    from model.examples import ExampleBuilder
    from model.nvila import load_tokenizer
    from curation.data.shards import read_shard

    model = NVILAForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    b = ExampleBuilder(model, tok, 512)
    exs = [e for u in shards for e in map(b, read_shard(u, kind="pair")) if e is not None][:max_samples]
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(exs), 16):
            chunk = exs[i: i + 16]
            out = model(**collate(chunk, tok.pad_token_id))
            total += out.loss.item() * len(chunk)
            n += len(chunk)
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=1200, help="pairs in the noisy pool")
    ap.add_argument("--noise-scale", type=float, default=1.5, help="x the default pair noise rates (1.5: about 58 %% noise)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per arm (same budget for all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip-threshold", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from curation.selection.curate import curate
    from curation.scoring.dfn import FilterTrainConfig, train_filter
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local
    from curation.data.shards import dataset_of, list_shards
    from curation.corpus.synth import DEFAULT_PAIR_RATES, DatasetSpec, SynthConfig, load_ground_truth, synthesize
    from training_hooks.bootstrap import init_tiny_model
    from training_hooks.kickoff import train_from_manifest
    from training_hooks.proxies import train_proxies

    t_all = time.time()
    rates = {k: min(1.0, v * args.noise_scale) for k, v in DEFAULT_PAIR_RATES.items()}
    total = sum(rates.values())
    if total > 0.95:
        rates = {k: v * 0.95 / total for k, v in rates.items()}
    with tempfile.TemporaryDirectory() as d:
        synthesize(f"{d}/pool", SynthConfig(seed=args.seed, datasets=[DatasetSpec("pool", "pair", args.pool, rates, 200)]))
        synthesize(f"{d}/trusted", SynthConfig(seed=args.seed + 1, datasets=[DatasetSpec("trusted", "pair", 600, {}, 200)]))
        synthesize(f"{d}/heldout", SynthConfig(seed=args.seed + 2, datasets=[DatasetSpec("heldout", "pair", 200, {}, 200)]))
        print(f"pool: {args.pool} pairs, injected noise rates {', '.join(f'{k}={v:.2f}' for k, v in rates.items())}")
        train_filter(f"{d}/trusted/trusted", f"{d}/dfn", FilterTrainConfig(steps=100, batch_size=64, warmup=10,
                                                                           shuffle_buffer=512, seed=args.seed))
        proxies = train_proxies(f"{d}/trusted/trusted", f"{d}/proxies", steps=40, batch_size=8, seed=args.seed,
                                info=lambda t: None)
        tasks = [ShardTask(u, dataset_of(u), "pair") for u in list_shards(f"{d}/pool/pool")]
        for spec in (ScorerSpec("basic"), ScorerSpec("clip", {"model": f"{d}/dfn"}, batch_size=64),
                     ScorerSpec("deltaloss", {"small": proxies["small"]["dir"], "large": proxies["large"]["dir"]}, batch_size=16)):
            r = score_local(tasks, spec, f"{d}/work")
            assert not r.failed, r.failed
        half = args.pool // 2
        arms = {
            "a_all": [],
            "b_random_50": [{"rule": "sql", "keep_where": "hash(key) % 2 = 0", "name": "random_half"}],
            "c_clip_top_50": [{"rule": "top_k", "column": "clip_score", "k": half}],
            "d_deltaloss_top_50": [{"rule": "top_k", "column": "delta_loss", "k": half}],
            "e_clip_then_deltaloss": [{"rule": "threshold", "column": "clip_score", "min": args.clip_threshold},
                                      {"rule": "top_k", "column": "delta_loss", "k": half}],
        }
        gt = load_ground_truth(f"{d}/pool")
        noise = {r["key"] for r in gt.iter_rows(named=True) if r["noise"] != "clean"}
        init = None
        results = {}
        for arm, rules in arms.items():
            policy = {"datasets": {"pool": rules}, "stages": {"image_sft": {"pool": 1.0}}}
            manifest, url = curate(f"{d}/work", policy, f"{d}/curated-{arm}", use_ray=False)
            if init is None:
                init = init_tiny_model(manifest, f"{d}/init", seed=args.seed)
            import duckdb

            kept = {k for (k,) in duckdb.sql(f"SELECT key FROM read_parquet('{manifest.decisions}') "
                                             f"WHERE dropped_by IS NULL").fetchall()}
            t0 = time.time()
            rep = train_from_manifest(url, {"init": init, "output": f"{d}/train-{arm}", "seed": args.seed,
                                            "ray": {"enabled": False},
                                            "defaults": {"batch_size": args.batch, "max_length": 512,
                                                         "save_every": args.steps, "warmup_steps": 10},
                                            "stages": {"image_sft": {"steps": args.steps, "lr": 1e-3}}}, info=lambda t: None)
            loss = heldout_loss(rep["final_checkpoint"], list_shards(f"{d}/heldout/heldout"))
            results[arm] = {"kept": len(kept), "noise_survived": round(len(kept & noise) / max(1, len(noise)), 3),
                            "noise_share_of_kept": round(len(kept & noise) / max(1, len(kept)), 3),
                            "heldout_clean_loss": round(loss, 4), "train_seconds": round(time.time() - t0, 1)}
            print(f"  {arm:<24} kept {len(kept):5d}  noise survived {results[arm]['noise_survived']:.1%}  "
                  f"held-out clean loss {loss:.4f}")
    out = {"pool": args.pool, "noise_rates": rates, "steps": args.steps, "batch": args.batch, "arms": results,
           "seconds": round(time.time() - t_all, 1)}
    print()
    print("| arm | kept | injected noise surviving | noise share of kept | held-out clean loss |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        print(f"| {arm} | {r['kept']} | {r['noise_survived']:.1%} | {r['noise_share_of_kept']:.1%} | {r['heldout_clean_loss']:.4f} |")
    print(f"\ntotal {out['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
