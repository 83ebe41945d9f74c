"""The end-to-end demo on embedded defaults (``curate demo``), growing as the pipeline lands.

Today: synthesize a noisy corpus and a trusted clean set; read everything back and check
it against the ground truth; train a DFN filter on the trusted set; score the corpus with
the basic and CLIP scorers on Ray; query the score store with DuckDB and report how well
the scores separate injected noise from clean samples; select with an embedded policy,
reshard the kept samples byte for byte and write the manifest; report how much injected
noise was dropped and how many clean samples were kept.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from curation.dfn import FilterTrainConfig, roc_auc, train_filter
from curation.shards import list_shards, read_shard
from curation.synth import UNREADABLE_NOISE, DatasetSpec, SynthConfig, load_ground_truth, synthesize

# The demo's embedded policy: validity, exact and near dedup, the CLIP filter, stage plan
DEFAULT_POLICY: dict[str, Any] = {
    "defaults": [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 2}],
    "datasets": {
        "coyo_synth": [{"rule": "dedup"}, {"rule": "near_dedup", "max_distance": 4},
                       {"rule": "threshold", "column": "clip_score", "min": 0.3}],
        "cc3m_synth": [{"rule": "dedup"}, {"rule": "near_dedup", "max_distance": 4},
                       {"rule": "threshold", "column": "clip_score", "min": 0.3}],
        "mmc4_synth": [{"rule": "dedup"}, {"rule": "threshold", "column": "clip_score", "min": 0.3}],
        "video_synth": [{"rule": "dedup"}, {"rule": "threshold", "column": "clip_score", "min": 0.3}],
    },
    "stages": {
        "align": {"coyo_synth": 1.0, "cc3m_synth": 1.0},
        "vision_pretrain": {"coyo_synth": 1.0},
        "pretrain": {"mmc4_synth": 1.0, "coyo_synth": 0.5},
        "image_sft": {"cc3m_synth": 1.0},
        "video_sft": {"video_synth": 1.0, "cc3m_synth": 0.25},
    },
}

# DFN steps per corpus size: enough to separate mismatched captions on this CPU
_FILTER_STEPS = {"tiny": 60, "small": 150, "medium": 400, "large": 1000}


@dataclass
class DemoHooks:
    """How the demo talks to its caller (the CLI prints, a flow logs)."""

    section: Callable[[str], None] = print
    info: Callable[[str], None] = print
    synth_progress: Callable[[str, int], None] | None = None
    train_progress: Callable[[int, float], None] | None = None
    score_progress: Callable[[Any, int, int], None] | None = None


def check_against_ground_truth(corpus: str, shard_urls: list[str]) -> dict[str, Any]:
    truth = {(r["dataset"], r["key"]): (r["kind"], r["noise"]) for r in load_ground_truth(corpus).iter_rows(named=True)}
    seen: Counter = Counter()
    mismatches = []
    for url in list_shards(shard_urls):
        for s in read_shard(url):
            kind, noise = truth.get((s.dataset, s.key), (s.kind, "<not in ground truth>"))
            seen["samples"] += 1
            seen["unreadable"] += s.error is not None
            expect_error = noise in UNREADABLE_NOISE or (kind == "interleaved" and noise == "corrupt_image")
            if (s.error is not None) != expect_error:
                mismatches.append({"dataset": s.dataset, "key": s.key, "noise": noise, "error": s.error})
    return {"samples": seen["samples"], "unreadable": seen["unreadable"], "disagreements": mismatches,
            "in_ground_truth": len(truth)}


def run_demo(out: str = "./curate-demo", size: str = "small", seed: int = 0, hooks: DemoHooks | None = None) -> dict[str, Any]:
    from curation.engine import run_scoring
    from curation.recipe import check_recipe, load_score_recipe
    from curation.store import ScoreStore

    h = hooks or DemoHooks()
    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    corpus, trusted_dir = os.path.join(out, "corpus"), os.path.join(out, "trusted")
    report: dict[str, Any] = {"out": os.path.abspath(out), "size": size, "seed": seed, "timings_s": {}}

    h.section("1. synthesize a corpus with known noise, and a trusted clean set")
    t0 = time.time()
    cfg = SynthConfig.preset(size, seed=seed)
    result = synthesize(corpus, cfg, workers=min(2, os.cpu_count() or 1), progress=h.synth_progress)
    n_trusted = max(400, cfg.datasets[0].samples)
    trusted_cfg = SynthConfig(seed=seed + 1000, datasets=[DatasetSpec("trusted_pairs", "pair", n_trusted, {}, 200)])
    synthesize(trusted_dir, trusted_cfg)
    report["corpus"] = result.summary()
    report["timings_s"]["synthesize"] = round(time.time() - t0, 1)

    h.section("2. read every shard back and check it against the ground truth")
    check = check_against_ground_truth(corpus, [s.url for v in result.shards.values() for s in v])
    report["read_check"] = {**check, "disagreements": len(check["disagreements"])}
    h.info(f"read {check['samples']} samples, {check['unreadable']} unreadable; "
           f"{len(check['disagreements'])} disagreements with the ground truth")
    if check["disagreements"]:
        raise RuntimeError(f"reader and ground truth disagree: {check['disagreements'][:5]}")

    h.section("3. train a DFN-style CLIP filter on the trusted pairs")
    t0 = time.time()
    steps = _FILTER_STEPS.get(size, 400)
    filt_dir = os.path.join(out, "models", "dfn-filter")
    fr = train_filter(os.path.join(trusted_dir, "trusted_pairs"), filt_dir,
                      FilterTrainConfig(steps=steps, batch_size=64, warmup=10, seed=seed, shuffle_buffer=512),
                      progress=h.train_progress)
    report["filter"] = {"dir": filt_dir, "steps": fr.steps, "final_loss": round(fr.final_loss, 4), "seconds": fr.seconds}
    report["timings_s"]["train_filter"] = round(time.time() - t0, 1)
    h.info(f"filter trained: {fr.steps} steps, loss {fr.losses[0]:.3f} -> {fr.final_loss:.3f}, saved to {filt_dir}")

    h.section("4. score every sample (basic facts + CLIP filter) on Ray")
    t0 = time.time()
    work = os.path.join(out, "work")
    recipe_path = os.path.join(out, "score.yaml")
    recipe = {
        "work": "work",
        "ray": {"num_cpus": min(2, os.cpu_count() or 1)},
        "sources": [{"shards": f"corpus/{d.name}", "kind": d.kind} for d in cfg.datasets],
        "scorers": [
            {"name": "basic", "workers": 1, "batch_size": 64},
            {"name": "clip", "params": {"model": "models/dfn-filter", "num_frames": 4}, "batch_size": 64, "workers": 2},
        ],
    }
    with open(recipe_path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    tasks, specs = check_recipe(load_score_recipe(recipe_path))
    runs = []
    for spec in specs:
        r = run_scoring(tasks, spec, work, progress=h.score_progress, num_cpus=recipe["ray"]["num_cpus"])
        runs.append(r.summary())
        h.info(f"{spec.name}: {len(r.scored)} shards scored, {len(r.skipped)} already done, {len(r.failed)} failed, "
               f"{r.summary()['samples_per_s']} samples/s")
        if r.failed:
            raise RuntimeError(f"scoring failed for {[(s.url, s.failed) for s in r.failed]}")
    report["scoring"] = runs
    report["timings_s"]["score"] = round(time.time() - t0, 1)

    h.section("5. query the score store (DuckDB) against the ground truth")
    store = ScoreStore(work)
    gt_path = os.path.join(corpus, "ground_truth.parquet").replace("'", "''")
    store.con.execute(f"CREATE OR REPLACE VIEW truth AS SELECT * FROM read_parquet('{gt_path}')").fetchall()
    per_noise = store.query_pl(
        "SELECT s.dataset, t.noise, count(*) AS samples, count(s.clip_score) AS scored, "
        "round(avg(s.clip_score), 3) AS mean_clip_score, sum(CASE WHEN NOT s.decodable THEN 1 ELSE 0 END) AS undecodable "
        "FROM scores s JOIN truth t USING (dataset, shard, key) GROUP BY 1, 2 ORDER BY 1, 4 DESC"
    )
    report["per_noise"] = per_noise.to_dicts()
    sep = {}
    for ds in per_noise["dataset"].unique().sort().to_list():
        df = store.query_pl(
            f"SELECT t.noise, s.clip_score FROM scores s JOIN truth t USING (dataset, shard, key) "
            f"WHERE s.dataset = '{ds}' AND s.clip_score IS NOT NULL")
        clean = df.filter(df["noise"] == "clean")["clip_score"].to_numpy()
        mism = df.filter(df["noise"].is_in(["mismatched_caption", "mismatched_doc"]))["clip_score"].to_numpy()
        if len(clean) and len(mism):
            sep[ds] = round(roc_auc(clean, mism), 3)
    report["clip_auc_clean_vs_mismatched"] = sep
    h.info("ROC AUC of the CLIP filter, clean vs mismatched, per dataset: "
           + ", ".join(f"{k} {v}" for k, v in sep.items()))

    h.section("6. select with the default policy, reshard byte for byte, write the manifest")
    t0 = time.time()
    from curation.curate import curate
    from curation.manifest import summarize
    from curation.reshard import ReshardConfig

    policy_path = os.path.join(out, "policy.yaml")
    with open(policy_path, "w") as f:
        yaml.safe_dump(DEFAULT_POLICY, f, sort_keys=False)
    manifest, manifest_url = curate(work, policy_path, os.path.join(out, "curated"),
                                    ReshardConfig(max_samples=256, shuffle_seed=seed))
    h.info(summarize(manifest))
    caught = store.query_pl(
        f"SELECT t.dataset, t.noise, count(*) AS samples, count(*) FILTER (WHERE d.dropped_by IS NULL) AS kept "
        f"FROM read_parquet('{manifest.decisions}') d JOIN truth t USING (dataset, shard, key) GROUP BY 1, 2 ORDER BY 1, 2")
    report["noise_caught"] = caught.to_dicts()
    noisy = caught.filter(caught["noise"] != "clean")
    clean = caught.filter(caught["noise"] == "clean")
    report["noise_dropped_fraction"] = round(1 - noisy["kept"].sum() / max(1, noisy["samples"].sum()), 3)
    report["clean_kept_fraction"] = round(clean["kept"].sum() / max(1, clean["samples"].sum()), 3)
    report["manifest"] = {"id": manifest.id, "path": manifest_url}
    report["timings_s"]["curate"] = round(time.time() - t0, 1)
    h.info(f"injected noise dropped: {report['noise_dropped_fraction']:.1%}; clean samples kept: "
           f"{report['clean_kept_fraction']:.1%}; manifest {manifest.id} at {manifest_url}")
    report["timings_s"]["total"] = round(time.time() - t_start, 1)
    with open(os.path.join(out, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report
