"""Selection policies: YAML rules per dataset, compiled to one DuckDB query.

```yaml
defaults:                      # rules every dataset gets before its own (optional)
  - {rule: valid, decodable: true, min_size: 32, max_aspect_ratio: 4}
datasets:
  coyo_synth:
    - {rule: valid, min_caption_words: 2}
    - {rule: dedup, column: sha256}                   # exact duplicates: keep one
    - {rule: near_dedup, column: phash, max_distance: 4}
    - {rule: threshold, column: clip_score, min: 0.2}
    - {rule: top_fraction, column: clip_score, fraction: 0.3}   # DataComp "top 30 %"
  mmc4_synth:
    - {rule: top_k, column: delta_loss, fraction: 0.5}          # NVILA DeltaLoss: top 50 % within the dataset
stages:                        # which datasets feed which NVILA stage, with mixture weights
  align: {coyo_synth: 1.0}
  pretrain: {mmc4_synth: 1.0, coyo_synth: 0.5}
```

Rules run in order, like a pipeline of filters: each rule sees only the samples still kept
and drops some of them; the first rule that drops a sample is its reason. ``valid`` rules
read only the basic scorer's facts and run first (in their order), before scorer errors are
counted: an empty caption is dropped as ``valid:min_caption_words``, not as the DeltaLoss
error it also causes. A ``threshold`` rule may carry a ``calibration`` record saying which
trusted scores and quantile its ``min`` came from (``curation.selection.calibrate``). Ranking rules
(``top_fraction``, ``top_k``) rank the samples still kept, within their dataset, so the
union over datasets is NVILA's "top K within each sub-dataset". Samples that a scorer
could not score (``<scorer>_error`` set) are dropped first: reason ``unreadable`` when the sample could not
be read at all, ``scorer_error:<scorer>`` when one scorer failed on it (``drop_errors: false``
turns that off). Kept + dropped = scored, per dataset.

``near_dedup`` keeps exactly one sample of each connected group of near duplicates (hashes
within ``max_distance`` bits, linked transitively: chains and stars keep one): the highest
``prefer`` when given, then the first by ``(shard, key)``. A ``sql`` rule's ``keep_where``
must be one expression over the score columns (no statements, no ``;``, no comments, no
subqueries, balanced parentheses: refused at load, naming the rule), and selection runs on
a DuckDB connection that cannot reach files, the network or extensions
(``curation.selection.sqlsafe``). The compiled query is built in ``curation.selection.policy_sql``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curation.selection.rules import RULE_NAMES, Rule

NEW_FIELD_DEFAULTS = {"scope": "dataset", "prefer_datasets": [], "blocks": None}
STAGES = ("align", "vision_pretrain", "pretrain", "image_sft", "video_sft")


class PolicyError(ValueError):
    """A policy that cannot run; the message names the offending field."""


class RunOptions(BaseModel):
    """What a selection may use (``curation.selection.runner``); not part of the policy's identity."""

    model_config = ConfigDict(extra="forbid")
    memory_limit: Optional[str] = None  # DuckDB's, e.g. "2GB" (default: a quarter of the machine, <= 4 GB)
    temp_directory: Optional[str] = None  # where it spills (default: the system's temp folder)
    threads: Optional[int] = Field(None, ge=1)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: list[Rule] = Field(default_factory=list)
    datasets: dict[str, list[Rule]] = Field(default_factory=dict)
    stages: dict[str, dict[str, float]] = Field(default_factory=dict)
    drop_errors: bool = True
    run: Optional[RunOptions] = None

    @model_validator(mode="after")
    def _global_in_defaults(self) -> "Policy":
        for ds, rules in self.datasets.items():
            for i, r in enumerate(rules):
                if getattr(r, "scope", "dataset") == "global":
                    raise ValueError(f"datasets.{ds}[{i}]: scope: global compares samples across datasets; "
                                     f"put the rule under defaults:")
        return self

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for stage, mix in v.items():
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; NVILA stages are {', '.join(STAGES)}")
            for ds, w in mix.items():
                if not w > 0:
                    raise ValueError(f"stage {stage}: weight of {ds} must be > 0, got {w}")
        return v

    def rules_for(self, dataset: str) -> list[Any]:
        return list(self.defaults) + list(self.datasets.get(dataset, []))

    def fingerprint(self) -> str:
        body = self.model_dump(mode="json", exclude={"run"})  # resources do not change what is selected
        for rules in [body["defaults"], *body["datasets"].values()]:
            for r in rules:  # fields added later, at their defaults, leave the fingerprint as it was
                for k, default in NEW_FIELD_DEFAULTS.items():
                    if k in r and r[k] == default:
                        del r[k]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_policy(path_or_dict: str | dict[str, Any]) -> Policy:
    """Parse and validate a selection policy (a YAML file or a mapping)."""
    from curation.common.yamlfile import load_yaml_model

    # an empty policy would keep everything: surely not what its author meant
    policy, _ = load_yaml_model(path_or_dict, Policy, what="policy", error=PolicyError, hidden=RULE_NAMES,
                                empty_hint="give it rules (defaults:, datasets:) and stages:")
    return policy


# --------------------------------------------------------------------------- run


@dataclass
class SelectionResult:
    policy_fingerprint: str
    sql: str
    decisions_url: str
    counts: dict[str, dict[str, Any]]  # dataset -> {kind, scored, kept, dropped: {reason: n}}

    def kept_total(self) -> int:
        return sum(c["kept"] for c in self.counts.values())


class IncompleteScoresError(PolicyError):
    """A scorer the policy reads has no score file for some input shards."""


def incomplete_shards(store: Any, scorers: list[str]) -> list[tuple[str, str, str]]:
    """(dataset, shard, scorer) for every input shard that one of ``scorers`` has no score file for
    (input shards: those any scorer of the store has a score file for)."""
    have = {s: store.shards(s) for s in store.views}
    every = set().union(*have.values()) if have else set()
    return sorted((ds, sh, s) for s in scorers for ds, sh in every - have.get(s, set()))


def _refuse(missing: list[tuple[str, str, str]]) -> None:
    by_scorer: dict[str, list[str]] = {}
    for ds, sh, s in missing:
        by_scorer.setdefault(s, []).append(f"{ds}/{sh}")
    parts = [f"{s} has no scores for {len(v)} shard(s): {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
             for s, v in sorted(by_scorer.items())]
    raise IncompleteScoresError("incomplete scores: " + "; ".join(parts) + ". Score those shards again (`curate score`), "
                                "or pass --allow-incomplete to drop their samples as not_scored:<scorer>")


def run_selection(store: Any, policy: Policy, out: str | None = None, *, allow_incomplete: bool = False,
                  resources: Any = None) -> SelectionResult:
    """Apply a policy to the score store; write the decision table (every scored sample once,
    with ``dropped_by`` NULL when kept) to ``<work>/selection/<policy>/decisions.parquet``.

    Out of core (``curation.selection.runner``): memory is bounded by ``resources`` (a
    ``runner.Resources``; default: the policy's ``run:`` options, then a quarter of the machine).
    Refused (:class:`IncompleteScoresError`, naming scorers and shards) when a scorer the rules
    read has no score file for some input shard, unless ``allow_incomplete``: then those
    samples are dropped as ``not_scored:<scorer>`` before any rule sees them."""
    import duckdb

    from curation.data import storage
    from curation.selection.policy_sql import compile_policy
    from curation.selection.runner import Resources, execute
    from curation.selection.semantic_dedup import edge_tables

    datasets = store.datasets()
    if not datasets:
        raise PolicyError(f"no scored samples under {store.root}")
    owners = store.column_owners()
    compiled = compile_policy(policy, datasets, store.columns(), store.rows(), owners)
    missing = incomplete_shards(store, compiled.scorers)
    if missing and not allow_incomplete:
        _refuse(missing)
    if missing:
        compiled = compile_policy(policy, datasets, store.columns(), store.rows(), owners, not_scored=True)
    if resources is None:
        resources = Resources(**(policy.run.model_dump() if policy.run else {}))
    fp = policy.fingerprint()
    url = out or storage.join(store.work, "selection", fp, "decisions.parquet")
    try:
        counts = execute(store, compiled, url, resources, missing if missing else None,
                         edge_tables(policy, store, datasets),
                         {"curation.policy_fingerprint": fp, "curation.inputs_fingerprint": store.fingerprint()})
    except duckdb.Error as e:
        raise PolicyError(f"policy does not run against the score store: {e}") from None
    return SelectionResult(fp, compiled.sql, url, counts)


def recorded_fingerprints(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``policy_fingerprint`` and ``inputs_fingerprint`` (:meth:`ScoreStore.fingerprint`) that
    :func:`run_selection` recorded in a decision file's footer; {} when there is no such file or record."""
    import pyarrow.parquet as pq

    from curation.data import storage

    fs, path = storage.get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            md = pq.read_metadata(f).metadata or {}
    except (OSError, ValueError):  # missing, unreadable or not Parquet: nothing to reuse
        return {}
    return {k.decode()[len("curation."):]: v.decode() for k, v in md.items() if k.startswith(b"curation.")}
