"""The curation service: read, score, select and write training data for NVILA-style VLMs.

Floors, bottom up (each imports only from those below it; ``tests/test_layers.py`` checks):

- ``curation.common``: helpers every floor shares (YAML loader, Ray connection, read-ahead);
- ``curation.data``: storage over fsspec, tar records, typed samples, shard reader and writer;
- (``model``, ``scorers``: the NVILA model and the scorers, outside this package);
- ``curation.scoring``: recipes resolved into a plan, the Ray scoring engine, the score store;
- ``curation.corpus``: the synthetic corpus and the MMC4 import;
- ``curation.selection``: rules and policies compiled to SQL, resharding, the manifest;
- (``training_hooks``, ``flows``: training from a manifest, Prefect orchestration);
- ``curation.app``: the ``curate`` command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The public API: these names import from the package top and keep working when the modules
# under it move. They load on first use (PEP 562), so ``import curation`` stays cheap and pulls
# in neither Ray, DuckDB nor torch.
_PUBLIC: dict[str, str] = {
    # read shards
    "read_shard": "curation.data.shards",
    "list_shards": "curation.data.shards",
    "ShardWriter": "curation.data.writer",
    # score
    "ScoringPlan": "curation.scoring.plan",
    "load_score_recipe": "curation.scoring.recipe",
    "ScorerSpec": "curation.scoring.engine",
    "ShardTask": "curation.scoring.engine",
    "run_scoring": "curation.scoring.engine",
    "score_local": "curation.scoring.engine",
    "ScoreStore": "curation.scoring.store",
    # select and write
    "Policy": "curation.selection.policy",
    "load_policy": "curation.selection.policy",
    "run_selection": "curation.selection.policy",
    "select": "curation.selection.curate",
    "curate": "curation.selection.curate",
    "ReshardConfig": "curation.selection.reshard",
    "Manifest": "curation.selection.manifest",
    "load_manifest": "curation.selection.manifest",
    # scorers (also ``from scorers import build_scorer``)
    "build_scorer": "scorers",
    "scorer_names": "scorers",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'curation' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from curation.data.shards import list_shards, read_shard
    from curation.data.writer import ShardWriter
    from curation.scoring.engine import ScorerSpec, ShardTask, run_scoring, score_local
    from curation.scoring.plan import ScoringPlan
    from curation.scoring.recipe import load_score_recipe
    from curation.scoring.store import ScoreStore
    from curation.selection.curate import curate, select
    from curation.selection.manifest import Manifest, load_manifest
    from curation.selection.policy import Policy, load_policy, run_selection
    from curation.selection.reshard import ReshardConfig
    from scorers import build_scorer, scorer_names
