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

from flows.tasks import (
    curation_report,
    run_curate,
    evaluate_task,
    run_score,
    run_train,
    scoring_plan,
    selection_table,
    synthesize_task,
    train_filter_task,
    train_proxies_task,
    training_report,
)

DEMO_TRAIN_RECIPE = os.path.join(os.path.dirname(__file__), "recipes", "demo_train.yaml")
HELDOUT_IMAGES = 200  # fresh clean pairs the caption accuracy is measured on


def _train_and_evaluate(out: str, manifest: Any, manifest_path: str, seed: int, size: str) -> tuple[dict, dict]:
    """Train the demo's NVILA through its stages (flows/recipes/demo_train.yaml, budgets in epochs
    over the curated mixture), then ``curate eval`` the image_sft checkpoint on fresh clean images
    that no stage trained on (a seed of their own): caption accuracy and a gallery."""
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from flows import demo_parts as d
    from training_hooks.bootstrap import init_pretrained_model
    from training_hooks.vision_pretrain import REPORT

    init = os.path.join(out, "models", "nvila-demo")
    if not os.path.isfile(os.path.join(init, REPORT)):
        # NVILA starts from a pretrained SigLIP; this one is pretrained here, on clean pairs of its own
        n_pairs, steps = d.vision_pretrain_for(size)
        init_pretrained_model(manifest, init, os.path.join(out, "pretrain-pairs"), pairs=n_pairs, steps=steps, seed=seed,
                              pairs_seed=seed + 4000, info=print)
    with open(os.path.join(init, REPORT)) as f:
        vision = json.load(f)
    with open(DEMO_TRAIN_RECIPE) as f:
        recipe = dict(yaml.safe_load(f), init=init, output="train", seed=seed)
    train_path = os.path.join(out, "train.yaml")
    with open(train_path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    training = run_train(manifest_path, train_path)
    training_report(training)
    heldout = os.path.join(out, "heldout")
    if not os.path.isfile(os.path.join(heldout, "ground_truth.parquet")):
        synthesize(heldout, SynthConfig(seed=seed + 3000, datasets=[DatasetSpec("heldout_pairs", "pair", HELDOUT_IMAGES, {}, 200)]))
    sft = next((s["final"] for s in training["stages"] if s["stage"] == "image_sft"), training["final_checkpoint"])
    evaluation = evaluate_task(sft, os.path.join(heldout, "heldout_pairs"), os.path.join(out, "eval"), HELDOUT_IMAGES)
    training["vision_pretrain"] = {k: v for k, v in vision.items() if k != "curve"}
    return training, {k: v for k, v in evaluation.items() if k != "captions"} | {"checkpoint_stage": "image_sft"}


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.time()
    yield
    timings[name] = round(time.time() - t0, 1)


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
    return [run_score(plan, name) for name in plan.scorer_names]


def _curate(out: str, size: str, seed: int, filter_dir: str, scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The embedded policy, thresholds calibrated on trusted data; select, reshard, manifest."""
    from curation.corpus.synth import SynthConfig
    from flows import demo_parts as d

    policy_path = os.path.join(out, "policy.yaml")
    datasets = {spec.name: spec.kind for spec in SynthConfig.preset(size, seed=seed).datasets}
    with open(policy_path, "w") as f:
        yaml.safe_dump(d.calibrated_policy(out, seed, filter_dir, datasets), f, sort_keys=False)
    work = os.path.join(out, "work")
    curated = run_curate(work, policy_path, os.path.join(out, "curated"), 256, seed,
                         _scores=[s["config_hash"] for s in scores])
    selection_table(curated)
    curation_report(work, curated)
    return curated


def _report(out: str, report: dict[str, Any], manifest: Any, curated: dict[str, Any], log: Any) -> dict[str, Any]:
    """Ground-truth analysis, plots, ``demo_report.{md,html,json}``."""
    from flows import demo_parts as d

    analysis = d.analyze(os.path.join(out, "work"), os.path.join(out, "corpus"), curated["decisions"])
    report.update(analysis)
    plots = d.make_plots(out, analysis, manifest, report["training"])
    if report["caption_eval"]:
        plots["caption_gallery"] = report["caption_eval"]["gallery"]["png"]
    md, html = d.write_report(out, report, plots)
    report["report"] = {"markdown": md, "html": html}
    d.save_json(os.path.join(out, "demo_report.json"), report)
    log.info("injected noise dropped %.1f%%, clean kept %.1f%%; manifest %s; report %s",
             100 * report["noise_dropped_fraction"], 100 * report["clean_kept_fraction"], curated["id"], html)
    return {k: v for k, v in report.items() if not k.startswith("_")}


@flow(name="demo", log_prints=True)
def demo_flow(out: str = "./curate-demo", size: str = "small", seed: int = 0, train: bool = True) -> dict[str, Any]:
    from curation.corpus.synth import SynthConfig
    from curation.selection.manifest import load_manifest
    from flows import demo_parts as d

    log = get_run_logger()
    SynthConfig.preset(size)  # a bad size fails the run now, naming it
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    filter_steps, proxy_steps = d.steps_for(size)
    timings: dict[str, float] = {}
    t_all = time.time()
    with _timed(timings, "synthesize"):
        corpus, check = _synthesize(out, size, seed, log)
    with _timed(timings, "train_filter_and_proxies"):
        trusted = os.path.join(out, "trusted", "trusted_pairs")
        filt = train_filter_task(trusted, os.path.join(out, "models", "dfn-filter"), filter_steps, seed)
        proxies = train_proxies_task(trusted, os.path.join(out, "models", "proxies"), proxy_steps, seed)
    with _timed(timings, "score"):
        scores = _score(out, size, seed, filt["dir"], proxies)
    with _timed(timings, "curate"):
        curated = _curate(out, size, seed, filt["dir"], scores)
    manifest = load_manifest(curated["manifest"])
    training, evaluation = None, None
    if train:
        with _timed(timings, "train_and_eval"):
            training, evaluation = _train_and_evaluate(out, manifest, curated["manifest"], seed, size)
    timings["total"] = round(time.time() - t_all, 1)
    report = {"out": out, "size": size, "seed": seed, "corpus": corpus,
              "read_check": {**check, "disagreements": len(check["disagreements"])},
              "scoring": scores, "manifest": {"id": curated["id"], "path": curated["manifest"]},
              "training": training, "caption_eval": evaluation, "timings_s": timings}
    return _report(out, report, manifest, curated, log)
