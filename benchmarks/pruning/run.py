"""The pruning-quality benchmark's driver: pool, scores, arms x seeds, table, JSON, chart."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

from benchmarks.pruning import arms as A
from benchmarks.pruning.model import benchmark_model, training_recipe
from benchmarks.pruning.pool import PoolSpec, build_sets, describe


def prepare(root: str, args: Any, modes: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    """Pool, trusted and held-out sets; filter and proxies; score stores; the CLIP threshold."""
    t0 = time.time()
    spec = PoolSpec(samples=args.pool, noise_rate=args.noise_rate, seed=args.pool_seed)
    sets = build_sets(f"{root}/data", spec, trusted=args.trusted, heldout=args.heldout)
    say(f"pool: {describe(sets['truth'])}; head combinations {sets['heads']}")
    models = A.train_scoring_models(sets, root, args.pool_seed, modes, args.proxy_steps, args.proxy_rounds)
    works = A.score_pool(sets, root, models)
    clip_min = A.clip_threshold(sets["trusted"], models["dfn"])
    say(f"prepared in {time.time() - t0:.0f} s; CLIP threshold {clip_min:.3f}; " + proxy_summary(models))
    sizes = {ds: sum(1 for r in sets["truth"] if r["dataset"] == ds) for ds in sets["pool"]}
    return {"sets": sets, "models": models, "works": works, "clip_min": clip_min, "sizes": sizes,
            "prepare_seconds": round(time.time() - t0, 1)}


def proxy_summary(models: dict[str, Any]) -> str:
    return "; ".join(f"{mode}: " + ", ".join(f"{n} held-out {r['heldout_loss']:.3f} ({r['steps']} steps, "
                                              f"{r['parameters']} params, {r['seconds']:.0f} s)" for n, r in res.items())
                     for mode, res in models["proxies"].items())


def arm_list(default_mode: str, modes: list[str]) -> dict[str, tuple[str, str]]:
    """Arm name -> (policy arm, DeltaLoss mode); the other mode's DeltaLoss arms get its name."""
    out = {arm: (arm, default_mode) for arm in A.ARMS}
    for mode in modes:
        if mode != default_mode:
            out[f"deltaloss_{mode}_50"] = ("deltaloss_50", mode)
            out[f"clip_then_deltaloss_{mode}_50"] = ("clip_then_deltaloss_50", mode)
    return out


def run_arm(root: str, prep: dict[str, Any], name: str, policy_arm: str, mode: str, seed: int, init: str,
            steps: int) -> dict[str, Any]:
    """Curate, train and evaluate one arm for one seed."""
    from training_hooks.evaluate import evaluate_checkpoint
    from training_hooks.kickoff import train_from_manifest

    policy = A.arm_policy(policy_arm, prep["sizes"], seed, prep["clip_min"])
    _, url, kept = A.curate_arm(prep["works"][mode], name, policy, f"{root}/curated/{name}-{seed}")
    t0 = time.time()
    rep = train_from_manifest(url, training_recipe(init, f"{root}/train/{name}-{seed}", seed, steps), info=lambda t: None)
    ev = evaluate_checkpoint(rep["final_checkpoint"], prep["sets"]["heldout"], limit=10_000, gallery=8,
                             out_dir=f"{root}/eval/{name}-{seed}")
    truth = {(r["dataset"], r["key"]): r for r in prep["sets"]["truth"]}
    noisy = sum(truth[k]["noise"] != "clean" for k in kept)
    head = sum('"group": "head"' in truth[k]["detail"] for k in kept)
    return {"accuracy": ev["caption_accuracy"], "heldout_loss": ev["heldout_loss"].get("pair"),
            "per_attribute": ev["per_attribute"], "kept": len(kept), "noise_share_of_kept": noisy / max(1, len(kept)),
            "head_share_of_kept": head / max(1, len(kept)), "train_loss_last": rep["stages"][-1]["last_loss"],
            "seconds": round(time.time() - t0, 1)}


def run_seeds(root: str, prep: dict[str, Any], arms: dict[str, tuple[str, str]], seeds: list[int], steps: int,
              say: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    from curation.selection.manifest import load_manifest

    full_manifest = None
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for seed in seeds:
        for name, (policy_arm, mode) in arms.items():
            if full_manifest is None:  # every seed's model gets the full pool's tokenizer
                _, url, _ = A.curate_arm(prep["works"][mode], "full", A.arm_policy("full", prep["sizes"], 0, 0.0),
                                         f"{root}/curated/tokenizer")
                full_manifest = load_manifest(url)
            init = f"{root}/init-{seed}"
            if not os.path.exists(init):
                benchmark_model(full_manifest, init, seed)
            r = run_arm(root, prep, name, policy_arm, mode, seed, init, steps)
            runs[name].append(r)
            say(f"  seed {seed} {name:<34} kept {r['kept']:5d}  noise {r['noise_share_of_kept']:.1%}  head "
                f"{r['head_share_of_kept']:.1%}  accuracy {r['accuracy']:.3f}  held-out loss {r['heldout_loss']:.4f}  "
                f"({r['seconds']:.0f} s)")
    return runs


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    def mean(xs: list[float]) -> float:
        return round(statistics.fmean(xs), 4)

    def std(xs: list[float]) -> float:
        return round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0

    out = {}
    for arm, rs in runs.items():
        acc = [r["accuracy"] for r in rs]
        attrs = {a: mean([r["per_attribute"][a] for r in rs if r["per_attribute"][a] is not None] or [float("nan")])
                 for a in rs[0]["per_attribute"]}
        out[arm] = {"accuracy_mean": mean(acc), "accuracy_std": std(acc), "accuracy_per_seed": acc,
                    "heldout_loss_mean": mean([r["heldout_loss"] for r in rs]),
                    "heldout_loss_std": std([r["heldout_loss"] for r in rs]),
                    "noise_share_of_kept": mean([r["noise_share_of_kept"] for r in rs]),
                    "head_share_of_kept": mean([r["head_share_of_kept"] for r in rs]),
                    "kept_mean": mean([r["kept"] for r in rs]), "per_attribute_mean": attrs}
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| arm | caption accuracy (mean ± std) | held-out loss | noise share of kept | head share of kept | kept |",
             "|---|---|---|---|---|---|"]
    for arm, r in summary.items():
        lines.append(f"| {arm} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['heldout_loss_mean']:.4f} | "
                     f"{r['noise_share_of_kept']:.1%} | {r['head_share_of_kept']:.1%} | {r['kept_mean']:.0f} |")
    return "\n".join(lines)


def bar_chart(summary: dict[str, dict[str, Any]], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.bar(range(len(names)), [100 * summary[n]["accuracy_mean"] for n in names],
           yerr=[100 * summary[n]["accuracy_std"] for n in names], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out caption accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(args: Any, summary: dict[str, Any], prep: dict[str, Any], seconds: float) -> None:
    out = {"arms": summary, "seconds": round(seconds, 1), "pool": args.pool, "noise_rate": args.noise_rate,
           "seeds": args.seeds, "steps": args.steps, "deltaloss_mode": args.deltaloss_mode,
           "clip_threshold": prep["clip_min"], "prepare_seconds": prep["prepare_seconds"],
           "proxies": {m: {n: {k: r[k] for k in ("heldout_loss", "steps", "parameters", "seconds")}
                           for n, r in res.items()} for m, res in prep["models"]["proxies"].items()},
           "dfn_seconds": prep["models"]["dfn_seconds"], "pool_composition": describe(prep["sets"]["truth"])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    chart = args.chart or (os.path.splitext(args.json)[0] + ".png" if args.json else "pruning_quality.png")
    bar_chart(summary, chart, f"pool {args.pool}, noise {args.noise_rate:.0%}, {len(args.seeds)} seeds, "
                              f"{args.steps} steps; DeltaLoss mode {args.deltaloss_mode}")
    print(f"bar chart: {chart}")
