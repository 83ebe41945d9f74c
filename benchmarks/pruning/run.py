"""The pruning-quality benchmark's driver: per seed, sets, scores, arms and full data's curve; then
the summary, the table, the JSON and the chart."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

from benchmarks.pruning import arms as A
from benchmarks.pruning.model import CURVE, arm_steps, benchmark_model, training_recipe
from benchmarks.pruning.pool import PoolSpec, build_sets, describe


def prepare(root: str, args: Any, seed: int, modes: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    """One seed's sets (pool, trusted, calibration, held-out, pretraining pairs); filter and
    proxies; score stores; the CLIP threshold; Spearman of DeltaLoss against the likelihood."""
    t0 = time.time()
    spec = PoolSpec(samples=args.pool, noise_rate=args.noise_rate, seed=seed)
    source = getattr(args, "proxy_data", "trusted") == "source"
    sets = build_sets(f"{root}/data", spec, trusted=args.trusted, calib=args.calib, heldout=args.heldout,
                      pretrain=args.pretrain_pairs, proxy_trusted=args.trusted if source else 0)
    timings = {"sets": round(time.time() - t0, 1)}
    say(f"seed {seed} pool: {describe(sets['truth'])}; head combinations {sets['heads']}; held-out pairs {sets['held']}")
    init = None
    if getattr(args, "large_proxy", "small") == "pretrained":  # the arms' model, built before the proxies
        t = time.time()
        init = initial_model(root, sets, seed, args)
        timings["init_model"] = round(time.time() - t, 1)
    t = time.time()
    models = A.train_scoring_models(sets, root, seed, modes, args.proxy_steps, args.proxy_rounds,
                                    *proxy_sizes(getattr(args, "small_proxy", "tiny")), large_init=init)
    timings["filter_and_proxies"] = round(time.time() - t, 1)
    t = time.time()
    works = A.score_pool(sets, root, models)
    clip_min = A.clip_threshold(sets["calib"], models["dfn"])
    rho = A.spearman_delta_vs_likelihood(works[args.deltaloss_mode])
    timings["scoring"] = round(time.time() - t, 1)
    say(f"seed {seed} prepared in {time.time() - t0:.0f} s; CLIP threshold {clip_min:.3f}; Spearman(delta_loss, "
        f"-loss_large) {rho:.3f}; " + proxy_summary(models))
    sizes = {ds: sum(1 for r in sets["truth"] if r["dataset"] == ds) for ds in sets["pool"]}
    return {"sets": sets, "models": models, "works": works, "clip_min": clip_min, "sizes": sizes, "spearman": rho,
            "prepare_seconds": round(time.time() - t0, 1), "timings": timings, "init": init}


def initial_model(root: str, sets: dict[str, Any], seed: int, args: Any) -> str:
    """The seed's pretrained NVILA every arm starts from, its tokenizer trained on the whole
    pool's captions (a keep-everything manifest of the pool: the full arm's captions)."""
    from curation.selection.manifest import load_manifest
    from training_hooks.proxies import seed_manifest

    url = seed_manifest(list(sets["pool"].values()), f"{root}/pool-seed-work", f"{root}/pool-seed-curated")
    return benchmark_model(load_manifest(url), f"{root}/init", seed, f"{root}/data/pretrain",
                           pairs=args.pretrain_pairs, steps=args.pretrain_steps)


def proxy_sizes(small: str) -> tuple[tuple[Any, Any], float | None]:
    """The proxies' (small, large) sizes and the small one's learning rate: ``weak`` is
    ``model.SMALL_PROXY`` at ``SMALL_PROXY_LR``, else a bootstrap size name at the default."""
    from benchmarks.pruning.model import LARGE_PROXY, SMALL_PROXY, SMALL_PROXY_LR

    if small == "weak":
        return (SMALL_PROXY, LARGE_PROXY), SMALL_PROXY_LR
    return (small, LARGE_PROXY), None


def proxy_summary(models: dict[str, Any]) -> str:
    return "; ".join(f"{mode}: " + ", ".join(f"{n} held-out {r['heldout_loss']:.3f} ({r['steps']} steps, "
                                              f"{r['parameters']} params, {r['seconds']:.0f} s)" for n, r in res.items())
                     for mode, res in models["proxies"].items())


def arm_list(default_mode: str, modes: list[str], only: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """Arm name -> (policy arm, DeltaLoss mode); the other mode's DeltaLoss arms get its name.
    ``only``: these arms (by policy arm name) and full data, which every comparison needs."""
    out = {arm: (arm, default_mode) for arm in A.ARMS + A.DIAGNOSTIC_ARMS}
    for mode in modes:
        if mode != default_mode:
            out[f"deltaloss_{mode}_50"] = ("deltaloss_50", mode)
            out[f"clip_then_deltaloss_{mode}_50"] = ("clip_then_deltaloss_50", mode)
    return {k: v for k, v in out.items() if not only or v[0] == "full" or v[0] in only}


def train_eval(root: str, prep: dict[str, Any], name: str, url: str, kept: set[tuple[str, str]], init: str,
               seed: int, steps: int) -> dict[str, Any]:
    """Train one curated arm for ``steps`` from ``init`` and evaluate it on the held-out set."""
    from training_hooks.evaluate import evaluate_checkpoint
    from training_hooks.kickoff import train_from_manifest

    t0 = time.time()
    rep = train_from_manifest(url, training_recipe(init, f"{root}/train/{name}", seed, steps), info=lambda t: None)
    train_seconds = time.time() - t0
    ev = evaluate_checkpoint(rep["final_checkpoint"], prep["sets"]["heldout"], limit=10_000, gallery=4,
                             out_dir=f"{root}/eval/{name}")
    truth = {(r["dataset"], r["key"]): r for r in prep["sets"]["truth"]}
    noisy = sum(truth[k]["noise"] != "clean" for k in kept)
    head = sum('"group": "head"' in truth[k]["detail"] for k in kept)
    return {"accuracy": ev["caption_accuracy"], "all_right": ev["all_right"], "heldout_loss": ev["heldout_loss"].get("pair"),
            "per_attribute": ev["per_attribute"], "kept": len(kept), "noise_share_of_kept": noisy / max(1, len(kept)),
            "head_share_of_kept": head / max(1, len(kept)), "optimizer_steps": steps,
            "train_seconds": round(train_seconds, 1), "eval_seconds": ev["seconds"], "seconds": round(time.time() - t0, 1)}


def run_seed(root: str, prep: dict[str, Any], arms: dict[str, tuple[str, str]], seed: int, args: Any,
             say: Callable[[str], None]) -> dict[str, Any]:
    """Every arm of one seed at the budget, and full data at each point of its curve."""
    from curation.selection.manifest import load_manifest

    cur = {}
    oracle = A.oracle_keys(prep["sets"]["truth"], prep["sizes"], seed)
    for name, (policy_arm, mode) in arms.items():
        policy = A.arm_policy(policy_arm, prep["sizes"], seed, prep["clip_min"], oracle)
        _, url, kept = A.curate_arm(prep["works"][mode], name, policy, f"{root}/curated/{name}")
        cur[name] = (url, kept)
    # every arm's model gets the full pool's tokenizer (built in prepare when a proxy starts from it)
    init = prep.get("init")
    if init is None:
        t0 = time.time()
        init = benchmark_model(load_manifest(cur["full"][0]), f"{root}/init", seed, f"{root}/data/pretrain",
                               pairs=args.pretrain_pairs, steps=args.pretrain_steps)
        prep["timings"]["init_model"] = round(time.time() - t0, 1)
    say(f"seed {seed} initial model (vision pretraining) in {prep['timings']['init_model']:.0f} s")
    full_kept = len(cur["full"][1])
    out: dict[str, Any] = {"arms": {}, "curve": []}
    for name, (url, kept) in cur.items():
        r = train_eval(root, prep, name, url, kept, init, seed, arm_steps(args.budget, len(kept), full_kept, args.epochs))
        out["arms"][name] = r
        say(f"  seed {seed} {name:<26} kept {r['kept']:5d}  steps {r['optimizer_steps']:4d}  noise "
            f"{r['noise_share_of_kept']:.1%}  head {r['head_share_of_kept']:.1%}  accuracy {r['accuracy']:.3f}  "
            f"all right {r['all_right']:.3f}  held-out loss {r['heldout_loss']:.4f}  (train {r['train_seconds']:.0f} s)")
    for mult in getattr(args, "curve", None) or CURVE:
        epochs = args.epochs * mult
        if mult == 1.0:
            r = out["arms"]["full"]
        else:
            r = train_eval(root, prep, f"full-x{mult:g}", *cur["full"], init, seed, arm_steps("epochs", full_kept, full_kept, epochs))
            say(f"  seed {seed} full at {epochs:g} epochs: steps {r['optimizer_steps']}  accuracy {r['accuracy']:.3f}")
        out["curve"].append({"epochs": epochs, "steps": r["optimizer_steps"], "accuracy": r["accuracy"],
                             "train_seconds": r["train_seconds"]})
    return out


def one_seed(args: Any, seed: int, root: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything of one seed (its preparation, every arm, full data's curve), in this process."""
    import torch

    # one intra-op thread per seed: on a small shared machine more threads thrash instead of helping
    torch.set_num_threads(args.threads)
    modes = ["capability", "reference"] if args.compare_modes else [args.deltaloss_mode]
    say = lambda s: print(s, flush=True)  # noqa: E731
    prep = prepare(root, args, seed, modes, say)
    res = run_seed(root, prep, arm_list(args.deltaloss_mode, modes, getattr(args, "arms", None)), seed, args, say)
    return prep, res


def run_seeds(args: Any, base: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every seed, ``args.jobs`` at a time, each in a process of its own (seeds share nothing:
    running them side by side changes no figure, only the wall time)."""
    roots = [os.path.join(base, f"seed-{s}") for s in args.seeds]
    if args.jobs <= 1:
        done = [one_seed(args, s, r) for s, r in zip(args.seeds, roots)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            done = list(ex.map(one_seed, [args] * len(roots), args.seeds, roots))
    return [d[0] for d in done], [d[1] for d in done]


def _mean(xs: list[float]) -> float:
    return round(statistics.fmean(xs), 4)


def _std(xs: list[float]) -> float:
    return round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: means and std over seeds; full data's curve (mean steps -> mean accuracy) and best point."""
    arms = {}
    for arm in seeds[0]["arms"]:
        rs = [s["arms"][arm] for s in seeds]
        acc = [r["accuracy"] for r in rs]
        attrs = {a: _mean([r["per_attribute"][a] for r in rs if r["per_attribute"][a] is not None] or [float("nan")])
                 for a in rs[0]["per_attribute"]}
        arms[arm] = {"accuracy_mean": _mean(acc), "accuracy_std": _std(acc), "accuracy_per_seed": acc,
                     "kept": _mean([r["kept"] for r in rs]), "optimizer_steps": _mean([r["optimizer_steps"] for r in rs]),
                     "train_seconds": _mean([r["train_seconds"] for r in rs]),
                     "noise_share_of_kept": _mean([r["noise_share_of_kept"] for r in rs]),
                     "head_share_of_kept": _mean([r["head_share_of_kept"] for r in rs]),
                     "all_right_mean": _mean([r["all_right"] for r in rs]),
                     "heldout_loss_mean": _mean([r["heldout_loss"] for r in rs]), "per_attribute_mean": attrs}
    curve = []
    for i, point in enumerate(seeds[0]["curve"]):
        ps = [s["curve"][i] for s in seeds]
        curve.append({"epochs": point["epochs"], "steps": _mean([p["steps"] for p in ps]),
                      "accuracy_mean": _mean([p["accuracy"] for p in ps]), "accuracy_std": _std([p["accuracy"] for p in ps]),
                      "train_seconds": _mean([p["train_seconds"] for p in ps])})
    best = max(curve, key=lambda p: p["accuracy_mean"])
    return {"arms": arms, "full_curve": {str(round(p["steps"])): p["accuracy_mean"] for p in curve},
            "full_curve_points": curve, "full_best": best, "full_plateau": plateau(curve)}


def plateau(curve: list[dict[str, Any]], gain: float = 0.01) -> bool:
    """Full data at its plateau: at least 3 budgets and either the best is not the largest, or
    the largest gains less than ``gain`` (1 point) over the one before it."""
    if len(curve) < 3:
        return False
    acc = [p["accuracy_mean"] for p in sorted(curve, key=lambda p: p["steps"])]
    return max(acc) > acc[-1] or acc[-1] - acc[-2] < gain


def targets(summary: dict[str, Any]) -> dict[str, bool]:
    """The issue's "done when" checks, on the means (accuracy is a fraction: 1 point = 0.01);
    a check whose arms did not run (``--arms``) is left out."""
    arms, best = summary["arms"], summary["full_best"]["accuracy_mean"]
    acc = {a: r["accuracy_mean"] for a, r in arms.items()}
    out = {"full data at its plateau": summary["full_plateau"]}
    if "deltaloss_50" in acc:
        out["deltaloss_50 >= full_best - 1pt"] = acc["deltaloss_50"] >= best - 0.01
        if "random_50" in acc:
            out["deltaloss_50 >= random_50 + 3pt"] = acc["deltaloss_50"] >= acc["random_50"] + 0.03
        if "likelihood_50" in acc:
            out["deltaloss_50 >= likelihood_50"] = acc["deltaloss_50"] >= acc["likelihood_50"]
    if "clip_then_deltaloss_50" in acc:
        out["clip_then_deltaloss_50 >= full_best"] = acc["clip_then_deltaloss_50"] >= best
    return out


def oracle_ceiling(summary: dict[str, Any]) -> dict[str, Any] | None:
    """What the ground-truth half reaches against the targets (None without the oracle arm)."""
    r = summary["arms"].get("oracle_50")
    if r is None:
        return None
    best = summary["full_best"]["accuracy_mean"]
    return {"accuracy_mean": r["accuracy_mean"], "minus_full_best": round(r["accuracy_mean"] - best, 4),
            "reaches_full_best_minus_1pt": r["accuracy_mean"] >= best - 0.01, "reaches_full_best": r["accuracy_mean"] >= best}


def table(summary: dict[str, Any]) -> str:
    lines = ["| arm | caption accuracy (mean ± std) | all attributes right | held-out loss | kept | optimizer steps | "
             "train s | noise share of kept | head share of kept |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, r in summary["arms"].items():
        label = f"{arm} (ground-truth diagnostic)" if arm in A.DIAGNOSTIC_ARMS else arm
        lines.append(f"| {label} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['all_right_mean']:.3f} | "
                     f"{r['heldout_loss_mean']:.4f} | {r['kept']:.0f} | {r['optimizer_steps']:.0f} | {r['train_seconds']:.0f} | "
                     f"{r['noise_share_of_kept']:.1%} | {r['head_share_of_kept']:.1%} |")
    lines.append("\nfull data's curve: " + ", ".join(f"{p['epochs']:g} epochs ({p['steps']:.0f} steps) "
                                                     f"{p['accuracy_mean']:.3f} ± {p['accuracy_std']:.3f}"
                                                     for p in summary["full_curve_points"]))
    return "\n".join(lines)


def bar_chart(summary: dict[str, Any], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    names = list(arms)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.bar(range(len(names)), [100 * arms[n]["accuracy_mean"] for n in names],
           yerr=[100 * arms[n]["accuracy_std"] for n in names], capsize=4, color="#4C72B0")
    ax.axhline(100 * summary["full_best"]["accuracy_mean"], color="#C44E52", ls="--", lw=1,
               label=f"full data, best of its curve ({summary['full_best']['epochs']:g} epochs)")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out caption accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def proxies_record(preps: list[dict[str, Any]]) -> dict[str, Any]:
    """Each proxy's held-out loss (on the trainer's held-out slice of the trusted data), steps,
    parameters and seconds, per seed, and the mean held-out loss per proxy."""
    keys = ("heldout_loss", "steps", "parameters", "seconds", "heldout_by_round", "stopped_early", "init")
    per_seed = [{m: {n: {k: r.get(k) for k in keys} for n, r in res.items()}
                 for m, res in p["models"]["proxies"].items()} for p in preps]
    means = {m: {n: _mean([s[m][n]["heldout_loss"] for s in per_seed]) for n in res} for m, res in per_seed[0].items()}
    return {"heldout_loss_mean": means, "per_seed": per_seed}


def write_outputs(args: Any, summary: dict[str, Any], preps: list[dict[str, Any]], seconds: float,
                  cpu_seconds: float) -> dict[str, Any]:
    out = {"budget": args.budget, "epochs": args.epochs, "arms": summary["arms"], "full_curve": summary["full_curve"],
           "full_curve_points": summary["full_curve_points"], "full_best": summary["full_best"],
           "full_plateau": summary["full_plateau"],
           "spearman_delta_vs_neg_loss_large": _mean([p["spearman"] for p in preps]),
           "spearman_per_seed": [p["spearman"] for p in preps], "seconds": round(seconds, 1),
           "diagnostic_arms": {"oracle_50": "ground-truth diagnostic, not a scorer: drops every injected noise sample, "
                                            "keeps every clean tail sample, then head samples up to 50 % of each "
                                            "sub-dataset; the ceiling a 50 % selection reaches at this budget"},
           "oracle_ceiling": oracle_ceiling(summary),
           "proxy_data": getattr(args, "proxy_data", "trusted"), "small_proxy": getattr(args, "small_proxy", "tiny"),
           "large_proxy": getattr(args, "large_proxy", "small"),
           "cpu_seconds": round(cpu_seconds, 1), "targets": targets(summary), "seeds": args.seeds, "pool": args.pool,
           "noise_rate": args.noise_rate, "deltaloss_mode": args.deltaloss_mode, "proxies": proxies_record(preps),
           "clip_threshold_per_seed": [p["clip_min"] for p in preps],
           "prepare_seconds_per_seed": [p["prepare_seconds"] for p in preps], "jobs": args.jobs,
           "timings_per_seed": [p["timings"] for p in preps],
           "pool_composition_per_seed": [describe(p["sets"]["truth"]) for p in preps],
           "heldout_pairs_per_seed": [p["sets"]["held"] for p in preps]}
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
    chart = args.chart or (os.path.splitext(args.json)[0] + ".png" if args.json else "pruning_quality.png")
    bar_chart(summary, chart, f"pool {args.pool}, noise {args.noise_rate:.0%}, {len(args.seeds)} seeds, budget "
                              f"{args.budget} ({args.epochs:g} epochs); DeltaLoss mode {args.deltaloss_mode}")
    print(f"bar chart: {chart}")
    return out
