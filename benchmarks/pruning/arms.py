"""Scoring the pool with the real pipeline and the arms' selection policies.

Filter and proxies train on the trusted set only (``curation.scoring.dfn``,
``training_hooks.proxies``: a small and a ~9x larger proxy, both to convergence); the CLIP
threshold is calibrated on the calibration set, which the filter never saw; the pool is scored shard by shard by the scoring engine
(``score_local``: the same code path the Ray actors run) into a score store; every arm is a
policy that ``curation.selection.curate.curate`` compiles to SQL, reshards byte for byte and
records in a manifest. DeltaLoss modes score into separate stores (one ``deltaloss`` scorer
per store), sharing the basic and CLIP score files.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from curation.data.shards import dataset_of, list_shards
from curation.selection.sqlsafe import literal

ARMS = ("full", "random_50", "clip_50", "likelihood_50", "deltaloss_50", "clip_then_deltaloss_50")
# ground-truth diagnostics, not scorers: what a perfect 50 % selection reaches at the same budget
DIAGNOSTIC_ARMS = ("oracle_50",)


def oracle_keys(truth: list[dict[str, Any]], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """The ground-truth half of each sub-dataset (``oracle_50``, a diagnostic: it reads the labels
    no scorer sees): no injected noise, every clean tail sample, then head samples (a random
    subset, by ``seed``, spread over the head combinations as they come) up to 50 %."""
    import json

    import numpy as np

    out: dict[str, list[str]] = {}
    for ds, n in sizes.items():
        rows = [r for r in truth if r["dataset"] == ds and r["noise"] == "clean"]
        tail = [r["key"] for r in rows if json.loads(r["detail"]).get("group") != "head"]
        head = [r["key"] for r in rows if json.loads(r["detail"]).get("group") == "head"]
        rng = np.random.default_rng([seed, sum(ds.encode()), 41])
        room = max(0, n // 2 - len(tail))
        out[ds] = sorted(tail[: n // 2] + [head[i] for i in sorted(rng.permutation(len(head))[:room])])
    return out


def train_scoring_models(sets: dict[str, Any], root: str, seed: int, modes: list[str],
                         proxy_steps: int, max_rounds: int, proxy_sizes: tuple[Any, Any] = ("tiny", "small"),
                         small_lr: float | None = None, large_init: str | None = None) -> dict[str, Any]:
    """The DFN filter on the trusted set and, per DeltaLoss mode, the proxies (capability: both
    trained to convergence; ``proxy_sizes``: small, large; ``large_init``: the model the large
    capability proxy starts from, else random weights) on ``proxy_trusted`` when the sets have
    it (clean pairs of the pool's sources), else the trusted set; with their cost in seconds."""
    from benchmarks.pruning import model as M
    from curation.scoring.dfn import FilterTrainConfig, train_filter
    from training_hooks.proxies import train_proxies

    t0 = time.time()
    train_filter(sets["trusted"], f"{root}/dfn", FilterTrainConfig(steps=100, batch_size=64, warmup=10,
                                                                   shuffle_buffer=512, seed=seed))
    out: dict[str, Any] = {"dfn": f"{root}/dfn", "dfn_seconds": round(time.time() - t0, 1), "proxies": {}}
    for mode in modes:
        res = train_proxies(sets.get("proxy_trusted", sets["trusted"]), f"{root}/proxies-{mode}", steps=proxy_steps, batch_size=8, seed=seed,
                            mode=mode, pool=list(sets["pool"].values()) if mode == "reference" else None,
                            max_rounds=max_rounds, info=lambda t: None, converge_small=mode == "capability",
                            image_mode=M.IMAGE_MODE, sizes=proxy_sizes, small_lr=small_lr,
                            inits=(None, large_init if mode == "capability" else None))
        out["proxies"][mode] = res
    return out


def deltaloss_params(mode: str, proxies: dict[str, Any]) -> dict[str, str]:
    if mode == "reference":
        return {"pool": proxies["pool"]["dir"], "reference": proxies["reference"]["dir"]}
    return {"small": proxies["small"]["dir"], "large": proxies["large"]["dir"]}


def score_pool(sets: dict[str, Any], root: str, models: dict[str, Any]) -> dict[str, str]:
    """Score the pool: basic and CLIP once, DeltaLoss once per mode; a score store per mode."""
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local

    tasks = [ShardTask(u, dataset_of(u), "pair") for d in sets["pool"].values() for u in list_shards(d)]
    base = f"{root}/work-base"
    for spec in (ScorerSpec("basic"), ScorerSpec("clip", {"model": models["dfn"]}, batch_size=64)):
        _check(score_local(tasks, spec, base))
    works = {}
    for mode, proxies in models["proxies"].items():
        work = f"{root}/work-{mode}"
        shutil.copytree(base, work, dirs_exist_ok=True)
        _check(score_local(tasks, ScorerSpec("deltaloss", deltaloss_params(mode, proxies), batch_size=16), work))
        works[mode] = work
    return works


def _check(report: Any) -> None:
    if report.failed:
        raise RuntimeError(f"scoring failed: {report.failed}")


def clip_threshold(calib: str, dfn: str) -> float:
    """The CLIP threshold, calibrated (``curation.selection.calibrate``) on the calibration set's
    scores: clean pairs drawn like the trusted set's, which the filter never trained on."""
    from curation.selection.calibrate import DEFAULT_QUANTILE, quantile_threshold, score_trusted
    from scorers import build_scorer

    scores = score_trusted([calib], [build_scorer("clip", model=dfn)])
    return quantile_threshold(scores["clip_score"], DEFAULT_QUANTILE)[0]


def spearman_delta_vs_likelihood(work: str) -> float:
    """Spearman's rank correlation of ``delta_loss`` with ``-loss_large`` over the scored pool:
    near 1, DeltaLoss ranks like the large proxy's likelihood alone."""
    from scipy.stats import spearmanr

    from curation.scoring.store import ScoreStore

    rows = ScoreStore(work).con.execute(
        "SELECT delta_loss, loss_large FROM deltaloss WHERE delta_loss IS NOT NULL AND loss_large IS NOT NULL").fetchall()
    if len(rows) < 3:
        return float("nan")
    return round(float(spearmanr([r[0] for r in rows], [-r[1] for r in rows]).statistic), 4)


def arm_policy(arm: str, sizes: dict[str, int], seed: int, clip_min: float,
               oracle: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The arm's selection policy: 50 % of each sub-dataset (all of it for ``full``);
    ``oracle_50`` keeps ``oracle``'s keys (``oracle_keys``) and nothing else."""
    half = {"rule": "top_k", "fraction": 0.5}
    per_arm: dict[str, list[dict[str, Any]]] = {
        "full": [],
        # a different random half per seed (about 50 %: a hash of the key and the seed)
        "random_50": [{"rule": "sql", "keep_where": f"hash(key || '-{seed}') % 2 = 0", "name": "random_half"}],
        "clip_50": [{**half, "column": "clip_score"}],
        # the large proxy's likelihood alone: what DeltaLoss would be if the small proxy were a constant
        "likelihood_50": [{**half, "column": "loss_large", "ascending": True}],
        "deltaloss_50": [{**half, "column": "delta_loss"}],
    }
    datasets = {ds: list(per_arm.get(arm, [])) for ds in sizes}
    if arm == "oracle_50":
        if oracle is None:
            raise ValueError("oracle_50 needs the ground-truth keys (oracle_keys)")
        datasets = {ds: [{"rule": "sql", "name": "oracle_half",
                          "keep_where": "key IN (" + ", ".join(map(literal, oracle[ds])) + ")" if oracle[ds] else "false"}]
                    for ds in sizes}
    if arm == "clip_then_deltaloss_50":  # CLIP filter, then DeltaLoss down to half of the sub-dataset
        datasets = {ds: [{"rule": "threshold", "column": "clip_score", "min": clip_min},
                         {"rule": "top_k", "column": "delta_loss", "k": n // 2}] for ds, n in sizes.items()}
    total = sum(sizes.values())
    return {"datasets": datasets, "stages": {"image_sft": {ds: n / total for ds, n in sizes.items()}}}


def curate_arm(work: str, arm: str, policy: dict[str, Any], out: str) -> tuple[Any, str, set[tuple[str, str]]]:
    """Select, reshard and write the arm's manifest; the (dataset, key) pairs it kept."""
    import pyarrow.parquet as pq

    from curation.selection.curate import curate

    if os.path.exists(out):
        shutil.rmtree(out)
    manifest, url = curate(work, policy, out, use_ray=False)
    t = pq.read_table(manifest.decisions, columns=["dataset", "key", "dropped_by"]).to_pylist()
    return manifest, url, {(r["dataset"], r["key"]) for r in t if r["dropped_by"] is None}
