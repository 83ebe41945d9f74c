"""Cache keys on content, not on names.

A nightly deployment passes the same paths every night, so a key built from the parameters
(Prefect's ``INPUTS``) would return last night's summary while new shards wait for a week.
Each key here covers what its task *reads*: the bytes of the recipe, policy and manifest
files, and the version of every input shard or score file (size and mtime locally, the ETag
on S3: metadata only, nothing is read twice). The task's source and plain parameters are
part of every key too.

A cached summary must never stand in for files that no longer exist: when a task's own output
is missing (a wiped score store, a deleted ``out``), the flows call it with
``refresh_cache=True`` (``fresh_unless``), so it runs and its entry is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

CACHE_TTL = timedelta(days=7)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(url: str) -> str:
    from curation.data import storage

    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def score_key(context: Any, params: dict[str, Any]) -> str:
    """Recipe bytes, every input shard's version, each scorer's config hash (weights included):
    ``ScoringPlan.fingerprint``."""
    scorers = params["scorers"]
    return params["plan"].fingerprint(*([scorers] if isinstance(scorers, str) else scorers))


def curate_key(context: Any, params: dict[str, Any]) -> str:
    """Policy bytes and the version of every score file the selection reads."""
    from curation.data import storage

    return _sha({"policy": _file_sha(params["policy_path"]),
                 "scores": storage.versions(storage.join(params["work"], "scores"))})


def _train_recipe(recipe: str | dict[str, Any]) -> tuple[str, str | None]:
    """(recipe text, its output folder resolved as the training recipe resolves it)."""
    import yaml

    if isinstance(recipe, str):
        with open(recipe) as f:
            text = f.read()
        data, base = yaml.safe_load(text), os.path.dirname(os.path.abspath(recipe))
    else:
        text, data, base = json.dumps(recipe, sort_keys=True), recipe, os.getcwd()
    output = data.get("output") if isinstance(data, dict) else None
    return text, (os.path.join(base, os.path.expanduser(output)) if isinstance(output, str) else None)


def train_key(context: Any, params: dict[str, Any]) -> str:
    """Manifest bytes (its id covers every curated shard) and the training recipe's content."""
    return _sha({"manifest": _file_sha(params["manifest"]), "recipe": _train_recipe(params["recipe"])[0]})


def train_output_present(recipe: str | dict[str, Any]) -> bool:
    out = _train_recipe(recipe)[1]
    return bool(out) and os.path.isdir(out)


def fresh_unless(task: Any, outputs_present: bool) -> Any:
    """``task`` as is when its outputs exist; else with ``refresh_cache`` so it runs and re-caches."""
    return task if outputs_present else task.with_options(refresh_cache=True)


@dataclass
class ByContent(CachePolicy):
    """Task source + parameters + ``content``'s key of what the task reads."""

    content: Optional[Callable[[Any, dict[str, Any]], str]] = None
    exclude: list[str] = field(default_factory=list)  # parameters ``content`` already covers (not hashable as is)

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        key = self.content(task_ctx, inputs) if self.content else ""
        plain = {k: v for k, v in inputs.items() if k not in self.exclude}
        base = (TASK_SOURCE + INPUTS).compute_key(task_ctx=task_ctx, inputs=plain, flow_parameters=flow_parameters,
                                                  **kwargs)
        return _sha([base, key])
