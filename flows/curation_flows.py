"""Curation flows: score, select, reshard, and all three (``curate``) with a manifest at the end."""

from __future__ import annotations

import os
from typing import Any, Optional

from prefect import flow, get_run_logger

from flows.tasks import curation_report, run_curate, run_scores, scoring_plan, select_task, selection_table


@flow(name="score", log_prints=True)
def score_flow(recipe: str) -> list[dict[str, Any]]:
    """Score every shard of the recipe's sources with its scorers: one task per fused pass (Ray inside)."""
    plan = scoring_plan(recipe)
    return run_scores(plan)


@flow(name="select", log_prints=True)
def select_flow(work: str, policy: str, allow_incomplete: bool = False) -> dict[str, Any]:
    """Selection alone; refused when a scorer the policy reads lacks some shards, unless ``allow_incomplete``."""
    res = select_task(work, policy, allow_incomplete)
    rows = [{"dataset": ds, "reason": r, "samples": n} for ds, c in res["counts"].items()
            for r, n in [("(kept)", c["kept"]), *c["dropped"].items()]]
    from prefect.artifacts import create_table_artifact

    create_table_artifact(rows, key="selection", description="Kept and dropped samples per dataset and reason")
    return res


@flow(name="reshard", log_prints=True)
def reshard_flow(work: str, policy: str, out: str, max_samples: int = 1000, shuffle_seed: Optional[int] = None,
                 allow_incomplete: bool = False) -> dict[str, Any]:
    curated = run_curate(work, policy, out, max_samples, shuffle_seed, allow_incomplete=allow_incomplete)
    selection_table(curated)
    curation_report(work, curated)
    return curated


@flow(name="curate", log_prints=True)
def curate_flow(score_recipe: str, policy: str, out: str, max_samples: int = 1000,
                shuffle_seed: Optional[int] = None, allow_incomplete: bool = False) -> dict[str, Any]:
    """Score, select, reshard, manifest. Publishes the kept/dropped table and a report with histograms."""
    log = get_run_logger()
    if not os.path.exists(policy):
        raise FileNotFoundError(f"policy not found: {policy}")
    plan = scoring_plan(score_recipe)
    scores = run_scores(plan)
    work = plan.work
    curated = run_curate(work, policy, out, max_samples, shuffle_seed, _scores=[s["config_hash"] for s in scores],
                         allow_incomplete=allow_incomplete)
    selection_table(curated)
    curation_report(work, curated)
    log.info("manifest %s written to %s", curated["id"], curated["manifest"])
    return curated
