"""The one-command demo as a Prefect flow (``curate demo`` runs it on Prefect's ephemeral server).

Synthesize a corpus with known noise and a trusted clean set; check the readers against the
ground truth; train the DFN filter and the DeltaLoss proxies on the trusted set; score every
sample (basic, CLIP, DeltaLoss) on Ray; select with the embedded policy, reshard byte for
byte and write the manifest; train a tiny NVILA through its five stages from that manifest
(Ray Train); write a report with plots.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import yaml
from prefect import flow, get_run_logger

from flows.caching import fresh_unless, train_output_present
from flows.tasks import (
    curation_report,
    run_curate,
    evaluate_task,
    run_scores,
    run_train,
    scoring_plan,
    selection_table,
    synthesize_task,
    train_filter_task,
    train_proxies_task,
    train_task,
    training_report,
)

DEMO_TRAIN_RECIPE = os.path.join(os.path.dirname(__file__), "recipes", "demo_train.yaml")
HELDOUT_IMAGES = 200  # fresh clean pairs the caption accuracy is measured on
# torch threads of the flow's process and of the Ray Train worker (flows/recipes/demo_train.yaml):
# its small models train faster as single-threaded jobs side by side (flows/child.py)
DEMO_TORCH_THREADS = 1
CACHE_KEY = "demo_cache_key.json"  # in each part reused across runs: the seed and size it was built for


def _cached(path: str, marker: str, key: dict[str, Any]) -> bool:
    """Whether ``path`` holds ``marker`` built for ``key`` (seed, size); a part built for another
    key is removed, so it is rebuilt rather than reused."""
    import shutil

    stamp = os.path.join(path, CACHE_KEY)
    if os.path.isfile(os.path.join(path, marker)) and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == key:
                return True
    if os.path.isdir(path):
        shutil.rmtree(path)
    return False


def _stamp(path: str, key: dict[str, Any]) -> None:
    with open(os.path.join(path, CACHE_KEY), "w") as f:
        json.dump(key, f)


def _pretrained_init(out: str, manifest: Any, seed: int, size: str, pairs_ready: Any = None) -> tuple[str, dict[str, Any]]:
    """The NVILA both runs start from: built for the manifest, its vision tower pretrained on clean
    pairs of its own (NVILA starts from a pretrained SigLIP); reused when built for this seed and size.
    ``pairs_ready()`` waits for the pairs' own process (``_start_pretrain_pairs``), if one was started."""
    from flows import demo_parts as d
    from training_hooks.bootstrap import init_pretrained_model
    from training_hooks.vision_pretrain import REPORT

    init, pairs, key = _init_dir(out), _pairs_dir(out), {"seed": seed, "size": size}
    if pairs_ready is not None:
        pairs_ready()
    if not _cached(init, REPORT, key):
        n_pairs, steps = d.vision_pretrain_for(size)
        fresh_pairs = not _cached(pairs, "ground_truth.parquet", key)  # (synthesized by init_pretrained_model)
        init_pretrained_model(manifest, init, pairs, pairs=n_pairs, steps=steps, seed=seed, pairs_seed=_pairs_seed(seed),
                              info=print, workers=min(2, os.cpu_count() or 1))
        if fresh_pairs:
            _stamp(pairs, key)
        _stamp(init, key)
    with open(os.path.join(init, REPORT)) as f:
        vision = json.load(f)
    return init, {k: v for k, v in vision.items() if k != "curve"}


def _init_dir(out: str) -> str:
    return os.path.join(out, "models", "nvila-demo")


def _pairs_dir(out: str) -> str:
    return os.path.join(out, "pretrain-pairs")


def _pairs_seed(seed: int) -> int:
    return seed + 4000


def _start_pretrain_pairs(out: str, seed: int, size: str, train: bool) -> Any:
    """The tower's pretraining pairs, synthesized (and read and decoded for the tower) in a child
    process beside the filter and the proxies (a core idles once the filter is done) and on through
    scoring and curation, which leave a core idle too; None when there is nothing to synthesize,
    else what waits for it."""
    from flows import demo_parts as d
    from flows.child import Child
    from training_hooks.vision_pretrain import REPORT

    key, pairs = {"seed": seed, "size": size}, _pairs_dir(out)
    if not train or _cached(_init_dir(out), REPORT, key) or _cached(pairs, "ground_truth.parquet", key):
        return None
    child = Child("flows.demo_parts:pretrain_pairs", threads=1, pairs_dir=pairs, pairs=d.vision_pretrain_for(size)[0],
                  seed=_pairs_seed(seed))
    return lambda log: (child.result(log.info), _stamp(pairs, key))


def _heldout(out: str, seed: int, size: str) -> str:
    """Fresh clean pairs (a seed of their own) that no stage trains on, for caption accuracy."""
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize

    heldout, key = os.path.join(out, "heldout"), {"seed": seed, "size": size}
    if not _cached(heldout, "ground_truth.parquet", key):
        synthesize(heldout, SynthConfig(seed=seed + 3000, datasets=[DatasetSpec("heldout_pairs", "pair", HELDOUT_IMAGES, {}, 200)]))
        _stamp(heldout, key)
    return os.path.join(heldout, "heldout_pairs")


def _train_recipe(out: str, init: str, seed: int, name: str, steps: dict[str, int] | None = None,
                  on_ray: bool = True) -> str:
    """The demo's training recipe for one arm (flows/recipes/demo_train.yaml; budgets in epochs over
    the curated mixture; or with ``steps``: those stages only, each that many steps, without Ray),
    written to ``<out>/<name>.yaml``. ``on_ray=False`` trains every stage in this process."""
    with open(DEMO_TRAIN_RECIPE) as f:
        recipe = dict(yaml.safe_load(f), init=init, output=name, seed=seed)
    if not on_ray:
        recipe["ray"] = {"enabled": False}
    if steps is not None:
        recipe["stages"] = {st: {**{k: v for k, v in cfg.items() if k != "epochs"}, "steps": steps[st]}
                            for st, cfg in recipe["stages"].items() if st in steps}
        # the baseline trains in this process, beside the curated run's Ray Train worker: the same
        # arithmetic on one torch thread, as that worker
        recipe["ray"] = {"enabled": False}
    path = os.path.join(out, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path


def _curated_steps(manifest_path: str, recipe_path: str) -> dict[str, int]:
    """The optimizer steps each stage of the curated run will take (its epochs over the manifest),
    known before it trains, so the uncurated arm can train beside it."""
    from curation.selection.manifest import load_manifest
    from training_hooks.kickoff import stage_steps
    from training_hooks.recipe import load_train_recipe, plan_stages

    m, recipe = load_manifest(manifest_path), load_train_recipe(recipe_path)
    return {p.name: stage_steps(m, p, recipe.ray) for p in plan_stages(recipe, m)[0]}


def _evaluate(training: dict[str, Any], heldout: str, out_dir: str) -> dict[str, Any]:
    """``curate eval`` of the image_sft checkpoint: caption accuracy and a gallery."""
    sft = next((s["final"] for s in training["stages"] if s["stage"] == "image_sft"), training["final_checkpoint"])
    evaluation = evaluate_task(sft, heldout, out_dir, HELDOUT_IMAGES)
    return {k: v for k, v in evaluation.items() if k != "captions"} | {"checkpoint_stage": "image_sft"}


def _uncurated(out: str, seed: int) -> dict[str, Any]:
    """The same corpus with no selection at all (every readable sample, the same stage mixture),
    resharded into a manifest the trainer reads like the curated one."""
    from flows import demo_parts as d

    policy_path = os.path.join(out, "policy-uncurated.yaml")
    with open(policy_path, "w") as f:
        yaml.safe_dump(d.UNCURATED_POLICY, f, sort_keys=False)
    return run_curate(os.path.join(out, "work"), policy_path, os.path.join(out, "uncurated"), 256, seed)


def _train_both(out: str, curated: dict[str, Any], seed: int, size: str, timings: dict[str, Any],
                on_ray: bool = True, pairs_ready: Any = None) -> dict[str, Any]:
    """The curated NVILA through its five stages; beside it (on Ray Train, the curated run is a
    worker process of its own) the same NVILA on the uncurated corpus with the same steps per
    stage up to image_sft; then both image_sft checkpoints captioning the same held-out images."""
    from curation.selection.manifest import load_manifest

    with _timed(timings, "vision_pretrain"):
        init, vision = _pretrained_init(out, load_manifest(curated["manifest"]), seed, size, pairs_ready)
        heldout = _heldout(out, seed, size)
    recipe = _train_recipe(out, init, seed, "train", on_ray=on_ray)
    steps = _curated_steps(curated["manifest"], recipe)
    order = list(steps)
    upto = order[: order.index("image_sft") + 1] if "image_sft" in order else order
    with _timed(timings, "train_curated_and_uncurated"):
        run = (fresh_unless(train_task, train_output_present(recipe)).submit(curated["manifest"], recipe) if on_ray
               else run_train(curated["manifest"], recipe))
        uncurated = _uncurated(out, seed)
        training_u = run_train(uncurated["manifest"], _train_recipe(out, init, seed, "train-uncurated",
                                                                    {st: steps[st] for st in upto}))
        training = run.result() if on_ray else run
    if {s["stage"]: s["steps"] for s in training["stages"]} != steps:
        raise RuntimeError(f"the curated run took other steps than planned: {training['stages']} vs {steps}")
    training_report(training)
    training_report(training_u, key="training-report-uncurated")
    with _timed(timings, "eval"):
        evaluation = _evaluate(training, heldout, os.path.join(out, "eval"))
        evaluation_u = _evaluate(training_u, heldout, os.path.join(out, "eval-uncurated"))
    training["vision_pretrain"] = vision
    return {"training": training, "caption_eval": evaluation,
            "uncurated": {"manifest": {"id": uncurated["id"], "path": uncurated["manifest"]},
                          "samples": {ds: sel["kept"] for ds, sel in uncurated["selection"].items()},
                          "training": training_u, "caption_eval": evaluation_u}}


@contextmanager
def _timed(timings: dict[str, dict[str, float]], name: str) -> Iterator[None]:
    """Wall and CPU seconds of a phase (CPU: this process and every process it started, Ray's included)."""
    from flows.cputime import TreeCpuMeter

    t0 = time.time()
    with TreeCpuMeter() as cpu:
        yield
    timings[name] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu.seconds, 1)}


def _synthesize(out: str, size: str, seed: int, log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The noisy corpus and the trusted clean set; the readers checked against the ground truth."""
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from flows import demo_parts as d

    corpus = synthesize_task(os.path.join(out, "corpus"), size, seed)
    n_trusted = max(400, corpus["datasets"]["coyo_synth"]["samples"])
    synthesize(os.path.join(out, "trusted"),
               SynthConfig(seed=seed + 1000, datasets=[DatasetSpec("trusted_pairs", "pair", n_trusted, {}, 200)]))
    check = d.check_against_ground_truth(os.path.join(out, "corpus"),
                                         [os.path.join(out, "corpus", ds) for ds in corpus["datasets"]])
    log.info("readers vs ground truth: %d samples, %d unreadable, %d disagreements", check["samples"],
             check["unreadable"], len(check["disagreements"]))
    if check["disagreements"]:
        raise RuntimeError(f"reader and ground truth disagree: {check['disagreements'][:5]}")
    return corpus, check


def _score(out: str, size: str, seed: int, filter_dir: str, proxies: dict[str, str]) -> list[dict[str, Any]]:
    """Every sample scored by basic, CLIP (the trained filter) and DeltaLoss (the proxies)."""
    from curation.corpus.synth import SynthConfig
    from flows import demo_parts as d

    recipe_path = os.path.join(out, "score.yaml")
    with open(recipe_path, "w") as f:
        yaml.safe_dump(d.score_recipe(SynthConfig.preset(size, seed=seed).datasets, filter_dir, proxies), f, sort_keys=False)
    plan = scoring_plan(recipe_path)
    return run_scores(plan)


def _curate(out: str, size: str, seed: int, filter_dir: str, scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The embedded policy, thresholds calibrated on trusted data; select, reshard, manifest."""
    from curation.corpus.synth import SynthConfig
    from flows import demo_parts as d

    policy_path = os.path.join(out, "policy.yaml")
    datasets = {spec.name: spec.kind for spec in SynthConfig.preset(size, seed=seed).datasets}
    with open(policy_path, "w") as f:
        yaml.safe_dump(d.calibrated_policy(out, seed, filter_dir, datasets, reuse=lambda root: _cached(
            root, "ground_truth.parquet", {"seed": seed, "size": size}), built=lambda root: _stamp(
            root, {"seed": seed, "size": size})), f, sort_keys=False)
    work = os.path.join(out, "work")
    curated = run_curate(work, policy_path, os.path.join(out, "curated"), 256, seed,
                         _scores=[s["config_hash"] for s in scores])
    selection_table(curated)
    curation_report(work, curated)
    return curated


def _report(out: str, report: dict[str, Any], manifest: Any, curated: dict[str, Any], log: Any) -> dict[str, Any]:
    """Ground-truth analysis, plots, ``demo_report.{md,html,json}``."""
    from flows import demo_parts as d
    from flows.demo_report import write_report

    analysis = d.analyze(os.path.join(out, "work"), os.path.join(out, "corpus"), curated["decisions"])
    report.update(analysis)
    plots = d.make_plots(out, analysis, manifest, report["training"])
    if report["caption_eval"]:
        plots["caption_gallery"] = report["caption_eval"]["gallery"]["png"]
    if (report.get("uncurated") or {}).get("caption_eval"):
        plots["caption_gallery_uncurated"] = report["uncurated"]["caption_eval"]["gallery"]["png"]
    md, html = write_report(out, report, plots)
    report["report"] = {"markdown": md, "html": html}
    d.save_json(os.path.join(out, "demo_report.json"), report)
    log.info("injected noise dropped %.1f%%, clean kept %.1f%%; manifest %s; report %s",
             100 * report["noise_dropped_fraction"], 100 * report["clean_kept_fraction"], curated["id"], html)
    return {k: v for k, v in report.items() if not k.startswith("_")}


def warm_up() -> None:
    """What the flow needs first, done before it runs (``curate demo`` does it while Prefect's
    database migrates in a child process, which leaves a core idle): torch's import, and the local
    Ray its scoring would start (the CPUs the scoring recipe asks for; or the cluster in RAY_ADDRESS)."""
    import torch  # noqa: F401

    from curation.common.raycluster import ensure_ray
    from flows import demo_parts as d

    ensure_ray(d.ray_cpus())


@flow(name="demo", log_prints=True)
def demo_flow(out: str = "./curate-demo", size: str = "small", seed: int = 0, train: bool = True,
              ray_train: bool = True) -> dict[str, Any]:
    import torch

    from curation.corpus.synth import SynthConfig

    log = get_run_logger()
    SynthConfig.preset(size)  # a bad size fails the run now, naming it
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_TORCH_THREADS)
    try:
        return _demo(out, size, seed, train, ray_train, log)
    finally:
        torch.set_num_threads(threads)


def _demo(out: str, size: str, seed: int, train: bool, ray_train: bool, log: Any) -> dict[str, Any]:
    from curation.selection.manifest import load_manifest
    from flows import demo_parts as d

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    filter_steps, proxy_steps = d.steps_for(size)
    timings: dict[str, dict[str, float]] = {}
    t_all = time.time()
    with _timed(timings, "synthesize"):
        corpus, check = _synthesize(out, size, seed, log)
    with _timed(timings, "train_filter_and_proxies"):
        # side by side, one torch thread each: the filter in a child process, the proxies here
        # and the vision tower's pretraining pairs in a third process, taking the core the filter leaves
        # (it goes on through scoring and curation; the tower's pretraining waits for it)
        trusted = os.path.join(out, "trusted", "trusted_pairs")
        pairs_done = _start_pretrain_pairs(out, seed, size, train)
        filt_run = train_filter_task.submit(trusted, os.path.join(out, "models", "dfn-filter"), filter_steps, seed)
        proxies = train_proxies_task(trusted, os.path.join(out, "models", "proxies"), proxy_steps, seed)
        filt = filt_run.result()
    with _timed(timings, "score"):
        scores = _score(out, size, seed, filt["dir"], proxies)
    with _timed(timings, "curate"):
        curated = _curate(out, size, seed, filt["dir"], scores)
    manifest = load_manifest(curated["manifest"])
    trained = (_train_both(out, curated, seed, size, timings, ray_train, pairs_done and (lambda: pairs_done(log))) if train
               else {"training": None, "caption_eval": None})
    # the phases cover the run: its CPU seconds are theirs, summed
    timings["total"] = {"wall_s": round(time.time() - t_all, 1), "cpu_s": round(sum(t["cpu_s"] for t in timings.values()), 1)}
    report = {"out": out, "size": size, "seed": seed, "corpus": corpus,
              "read_check": {**check, "disagreements": len(check["disagreements"])},
              "scoring": scores, "manifest": {"id": curated["id"], "path": curated["manifest"]},
              "curated_samples": {ds: sel["kept"] for ds, sel in curated["selection"].items()},
              **trained, "timings": timings}
    return _report(out, report, manifest, curated, log)
