"""Training flows: from a manifest to NVILA stages, and the full pipeline (curate, then train)."""

from __future__ import annotations

import os
from typing import Any, Optional

from prefect import flow

from flows.curation_flows import curate_flow
from flows.tasks import run_train, training_report


@flow(name="train", log_prints=True)
def train_flow(manifest: str, recipe: str) -> dict[str, Any]:
    """Train NVILA stage by stage from a curated manifest; publishes loss curves and held-out losses."""
    for path, what in ((manifest, "manifest"), (recipe, "training recipe")):
        if "://" not in path and not os.path.exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
    report = run_train(manifest, recipe)
    training_report(report)
    return report


@flow(name="pipeline", log_prints=True)
def pipeline_flow(score_recipe: str, policy: str, out: str, train_recipe: str, max_samples: int = 1000,
                  shuffle_seed: Optional[int] = None) -> dict[str, Any]:
    """Curate, then train from the manifest just written."""
    if not os.path.exists(train_recipe):
        raise FileNotFoundError(f"training recipe not found: {train_recipe}")
    curated = curate_flow(score_recipe, policy, out, max_samples, shuffle_seed)
    report = train_flow(curated["manifest"], train_recipe)
    return {"curated": curated, "training": report}
