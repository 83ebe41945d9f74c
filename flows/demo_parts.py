"""Pieces of the end-to-end demo (``curate demo``; the flow is ``flows.demo.demo_flow``).

The embedded defaults: the policy, the scoring and training recipes, the ground-truth checks
of the readers, the analysis of what the selection caught, and the report (markdown + HTML
with plots).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable

from curation.scoring.dfn import roc_auc
from curation.data.shards import list_shards, read_shard
from curation.selection.sqlsafe import literal
from curation.corpus.synth import UNREADABLE_NOISE, load_ground_truth

# The demo's embedded policy: validity (incl. the caption rule), exact and near dedup, CLIP
# filters (pairs: image x caption; MMC4: every image's sentence under one-to-one assignment,
# so a document with a distractor image goes; video: frames x caption), a motion filter for static clips, stage plan.
# The ``min`` values here are placeholders: ``calibrated_policy`` replaces every one of them
# with a quantile of the same score on trusted data of the same kind (curation.selection.calibrate).
DEFAULT_POLICY: dict[str, Any] = {
    "defaults": [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 2}],
    "datasets": {
        "coyo_synth": [{"rule": "dedup"}, {"rule": "near_dedup", "max_distance": 4},
                       {"rule": "threshold", "column": "clip_score", "min": 0.3, "name": "clip_filter"}],
        "cc3m_synth": [{"rule": "dedup"}, {"rule": "near_dedup", "max_distance": 4},
                       {"rule": "threshold", "column": "clip_score", "min": 0.3, "name": "clip_filter"}],
        "mmc4_synth": [{"rule": "dedup"},
                       {"rule": "threshold", "column": "clip_assigned_min", "min": 0.3,
                        "name": "distractor_or_mismatched_image"}],
        "video_synth": [{"rule": "dedup"}, {"rule": "threshold", "column": "motion", "min": 0.01, "name": "static_clip"},
                        {"rule": "threshold", "column": "clip_score", "min": 0.3, "name": "clip_filter"}],
    },
    "stages": {
        "align": {"coyo_synth": 1.0, "cc3m_synth": 1.0},
        "vision_pretrain": {"coyo_synth": 1.0},
        "pretrain": {"mmc4_synth": 1.0, "coyo_synth": 0.5},
        "image_sft": {"cc3m_synth": 1.0, "coyo_synth": 1.0},
        "video_sft": {"video_synth": 1.0, "cc3m_synth": 0.25},
    },
}

# the uncurated baseline the demo trains beside the curated model: no filter, no dedup, every
# readable sample (unreadable ones are dropped: no trainer can read them), the same stage mixture
UNCURATED_POLICY: dict[str, Any] = {"defaults": [], "datasets": {}, "stages": DEFAULT_POLICY["stages"]}

# trusted calibration sets: fresh clean samples of each kind (not the ones the filter trained on)
CALIBRATION_SETS = {"pair": ("trusted_pairs", 600), "interleaved": ("trusted_docs", 200), "video": ("trusted_clips", 200)}


def calibrated_policy(out: str, seed: int, filter_dir: str, datasets: dict[str, str],
                      quantile: float | None = None, reuse: Callable[[str], bool] = os.path.isdir,
                      built: Callable[[str], None] = lambda root: None) -> dict[str, Any]:
    """DEFAULT_POLICY with every threshold read off trusted data (``datasets``: name -> kind):
    synthesize a clean calibration set per kind under ``<out>/calibration`` (unless ``reuse`` of
    that folder says the one there fits; ``built`` is called on a new one), score it with the
    same scorers and settings as the corpus, and take the ``quantile`` per dataset and column."""
    from curation.selection.calibrate import DEFAULT_QUANTILE, TrustedColumn, calibrate_policy, score_trusted
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from scorers.basic import BasicScorer
    from scorers.clip import ClipScorer

    root = os.path.join(out, "calibration")
    kinds = sorted(set(datasets.values()))
    specs = [DatasetSpec(CALIBRATION_SETS[k][0], k, CALIBRATION_SETS[k][1], {}, 100) for k in kinds]
    if not reuse(root) or not os.path.isfile(os.path.join(root, "ground_truth.parquet")):
        synthesize(root, SynthConfig(seed=seed + 2000, datasets=specs))
        built(root)
    scorers = [BasicScorer(), ClipScorer(model=filter_dir, num_frames=4, batch_size=64)]
    by_kind = {}
    for spec in specs:
        cols = score_trusted([os.path.join(root, spec.name)], scorers)
        by_kind[spec.kind] = {c: TrustedColumn(f"calibration/{spec.name}", v) for c, v in cols.items()}
    trusted = {ds: by_kind[kind] for ds, kind in datasets.items()}
    return calibrate_policy(DEFAULT_POLICY, trusted, DEFAULT_QUANTILE if quantile is None else quantile)


# per corpus size: DFN steps, proxy steps per stage (the demo's NVILA trains for epochs over the
# curated data: flows/recipes/demo_train.yaml)
SIZES = {"tiny": (60, 4), "small": (150, 10), "medium": (400, 30), "large": (1000, 60)}


def steps_for(size: str) -> tuple[int, int]:
    return SIZES.get(size, SIZES["medium"])


# per corpus size: clean pairs synthesized for the vision tower's pretraining (caption-word
# classification, one tile per image), and its steps (batch 128; the stand-in for SigLIP's
# pretraining is not the curated corpus, so it does not grow with it past ``small``). Distinct
# images are cheap to synthesize: 20000 pairs, each seen ~38 times.
VISION_PRETRAIN = {"tiny": (400, 30), "small": (20000, 6000)}


def vision_pretrain_for(size: str) -> tuple[int, int]:
    return VISION_PRETRAIN.get(size, VISION_PRETRAIN["small"])


def pretrain_pairs(pairs_dir: str, pairs: int, seed: int, info: Callable[[str], None] = print) -> dict[str, Any]:
    """The vision tower's pretraining pairs, synthesized in a child process (``flows.child``) beside
    the filter and the proxies: they depend on the seed and size only, not on the curated manifest."""
    from training_hooks.bootstrap import synthesize_pretrain_pairs

    synthesize_pretrain_pairs(pairs_dir, pairs, seed, decode_for="demo")  # read and decoded here, beside the filter
    info(f"{pairs} vision pretraining pairs ready (and decoded) in {pairs_dir}")
    return {"dir": pairs_dir, "pairs": pairs}


def train_filter(trusted: str, out: str, steps: int, seed: int, info: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo's DFN filter on the trusted pairs (``flows.tasks.train_filter_task`` runs it in a child process)."""
    from curation.scoring.dfn import FilterTrainConfig, train_filter as train

    r = train(trusted, out, FilterTrainConfig(steps=steps, batch_size=64, warmup=10, seed=seed, shuffle_buffer=512),
              progress=lambda s, loss: info(f"DFN step {s} loss {loss:.3f}") if s % 25 == 0 else None)
    return {"dir": out, "steps": r.steps, "final_loss": r.final_loss}


def ray_cpus() -> int:
    """The CPUs of the local Ray the demo scores (and trains) on."""
    return min(2, os.cpu_count() or 1)


def score_recipe(cfg_datasets: list[Any], filter_dir: str, proxies: dict[str, str]) -> dict[str, Any]:
    return {
        "work": "work",
        "ray": {"num_cpus": ray_cpus()},
        "sources": [{"shards": f"corpus/{d.name}", "kind": d.kind} for d in cfg_datasets],
        "scorers": [
            {"name": "basic", "workers": 1, "batch_size": 64},
            {"name": "clip", "params": {"model": filter_dir, "num_frames": 4}, "batch_size": 64, "workers": 2},
            {"name": "deltaloss", "params": {"small": proxies["small"], "large": proxies["large"], "max_length": 512},
             "batch_size": 16, "workers": 1},
        ],
    }


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


def analyze(work: str, corpus: str, decisions: str) -> dict[str, Any]:
    """Score distributions by injected noise, CLIP AUC per dataset, and noise caught by the selection."""
    from curation.scoring.store import ScoreStore

    store = ScoreStore(work)
    truth = literal(os.path.join(corpus, "ground_truth.parquet"))  # paths and names enter SQL only quoted
    store.con.execute(f"CREATE OR REPLACE VIEW truth AS SELECT * FROM read_parquet({truth})").fetchall()
    dl = ", round(avg(s.delta_loss), 3) AS mean_delta_loss" if "delta_loss" in store.columns() else ""
    per_noise = store.query_pl(
        "SELECT s.dataset, t.noise, count(*) AS samples, round(avg(s.clip_score), 3) AS mean_clip_score"
        f"{dl} FROM scores s JOIN truth t USING (dataset, shard, key) GROUP BY 1, 2 ORDER BY 1, 3 DESC")
    auc = {}
    for ds in per_noise["dataset"].unique().sort().to_list():
        df = store.con.sql("SELECT t.noise, s.clip_score FROM scores s JOIN truth t USING (dataset, shard, key) "
                           "WHERE s.dataset = ? AND s.clip_score IS NOT NULL", params=[ds]).pl()
        clean = df.filter(df["noise"] == "clean")["clip_score"].to_numpy()
        mism = df.filter(df["noise"].is_in(["mismatched_caption", "mismatched_doc"]))["clip_score"].to_numpy()
        if len(clean) and len(mism):
            auc[ds] = round(roc_auc(clean, mism), 3)
    caught = store.query_pl(
        f"SELECT t.dataset, t.noise, count(*) AS samples, count(*) FILTER (WHERE d.dropped_by IS NULL) AS kept, "
        f"mode(d.dropped_by) AS main_reason FROM read_parquet({literal(decisions)}) d JOIN truth t "
        f"USING (dataset, shard, key) GROUP BY 1, 2 ORDER BY 1, 2")
    noisy = caught.filter(caught["noise"] != "clean")
    clean = caught.filter(caught["noise"] == "clean")
    dl_col = "s.delta_loss" if dl else "NULL::DOUBLE AS delta_loss"
    scores = store.query_pl(f"SELECT s.dataset, t.noise, s.clip_score, {dl_col} FROM scores s JOIN truth t "
                            "USING (dataset, shard, key) WHERE s.clip_score IS NOT NULL")
    return {
        "per_noise": per_noise.to_dicts(),
        "clip_auc_clean_vs_mismatched": auc,
        "noise_caught": caught.to_dicts(),
        "noise_dropped_fraction": round(1 - noisy["kept"].sum() / max(1, noisy["samples"].sum()), 3),
        "clean_kept_fraction": round(clean["kept"].sum() / max(1, clean["samples"].sum()), 3),
        "_clip_scores": scores.to_dicts(),
    }


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def make_plots(out: str, analysis: dict[str, Any], manifest: Any, training: dict[str, Any] | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = os.path.join(out, "report")
    os.makedirs(d, exist_ok=True)
    plots = {}
    # score distributions: clean vs noise
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rows = analysis["_clip_scores"]
    for label, pick in (("clean", lambda n: n == "clean"), ("injected noise", lambda n: n != "clean")):
        ax.hist([r["clip_score"] for r in rows if pick(r["noise"])], bins=40, alpha=0.6, label=label)
    ax.set_xlabel("CLIP filter score (cosine)")
    ax.set_ylabel("samples")
    ax.legend()
    plots["score_distributions"] = _save(fig, os.path.join(d, "score_distributions.png"))
    # kept / dropped per reason
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, values = [], []
    for ds, sel in manifest.selection.items():
        labels.append(f"{ds}: kept")
        values.append(sel.kept)
        for r, n in sel.dropped.items():
            labels.append(f"{ds}: {r}")
            values.append(n)
    ax.barh(labels[::-1], values[::-1])
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel("samples")
    plots["kept_dropped"] = _save(fig, os.path.join(d, "kept_dropped.png"))
    # noise caught vs ground truth
    fig, ax = plt.subplots(figsize=(7, 3.5))
    agg: dict[str, list[int]] = {}
    for r in analysis["noise_caught"]:
        a = agg.setdefault(r["noise"], [0, 0])
        a[0] += r["samples"] - r["kept"]
        a[1] += r["kept"]
    names = sorted(agg)
    ax.barh(names, [agg[n][0] for n in names], label="dropped")
    ax.barh(names, [agg[n][1] for n in names], left=[agg[n][0] for n in names], label="kept")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend()
    ax.set_xlabel("samples (ground truth)")
    plots["noise_caught"] = _save(fig, os.path.join(d, "noise_caught.png"))
    scatter = _deltaloss_vs_clip(rows, d)
    if scatter:
        plots["deltaloss_vs_clip"] = scatter
    if training and os.path.isfile(training.get("loss_plot", "")):
        plots["loss_curves"] = training["loss_plot"]
    return plots


def _deltaloss_vs_clip(rows: list[dict[str, Any]], folder: str) -> str | None:
    """Every scored sample as a point (CLIP score, DeltaLoss), coloured by its injected noise:
    where each kind of noise sits shows which scorer catches it (None without DeltaLoss)."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("delta_loss") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    noises = sorted({r["noise"] for r in rows}, key=lambda n: (n != "clean", n))
    cmap = plt.get_cmap("tab20")
    for i, noise in enumerate(noises):
        pts = [r for r in rows if r["noise"] == noise]
        ax.scatter([r["clip_score"] for r in pts], [r["delta_loss"] for r in pts], s=6 if noise == "clean" else 12,
                   alpha=0.35 if noise == "clean" else 0.8, color="lightgray" if noise == "clean" else cmap(i % 20),
                   label=f"{noise} ({len(pts)})")
    ax.set_xlabel("CLIP filter score (cosine)")
    ax.set_ylabel("DeltaLoss (small proxy loss - large proxy loss)")
    ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(fig, os.path.join(folder, "deltaloss_vs_clip.png"))


def save_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump({k: v for k, v in data.items() if not k.startswith("_")}, f, indent=2, default=str)
