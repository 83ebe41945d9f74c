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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from curation.selection.rules import RULE_NAMES, Rule

STAGES = ("align", "vision_pretrain", "pretrain", "image_sft", "video_sft")


class PolicyError(ValueError):
    """A policy that cannot run; the message names the offending field."""


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: list[Rule] = Field(default_factory=list)
    datasets: dict[str, list[Rule]] = Field(default_factory=dict)
    stages: dict[str, dict[str, float]] = Field(default_factory=dict)
    drop_errors: bool = True

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
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


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


def run_selection(store: Any, policy: Policy, out: str | None = None) -> SelectionResult:
    """Apply a policy to the score store; write the decision table (every scored sample once,
    with ``dropped_by`` NULL when kept) to ``<work>/selection/<policy>/decisions.parquet``."""
    import io

    import duckdb
    import pyarrow.parquet as pq

    from curation.data import storage

    from curation.selection.policy_sql import compile_policy
    from curation.selection.sqlsafe import sandbox

    datasets = [r[0] for r in store.con.execute("SELECT DISTINCT dataset FROM scores ORDER BY 1").fetchall()]
    if not datasets:
        raise PolicyError(f"no scored samples under {store.root}")
    compiled = compile_policy(policy, datasets, store.columns())
    # the policy's SQL runs where it can read the scores it names and nothing else
    from curation.selection.semantic_dedup import edge_tables

    sql_con = sandbox(store.con, "scores", compiled.columns, edge_tables(policy, store, datasets))
    try:
        table = sql_con.sql(compiled.sql).to_arrow_table()
    except duckdb.Error as e:
        raise PolicyError(f"policy does not run against the score store: {e}") from None
    finally:
        sql_con.close()
    fp = policy.fingerprint()
    url = out or storage.join(store.work, "selection", fp, "decisions.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(url, buf.getvalue(), store.storage_options)
    counts: dict[str, dict[str, Any]] = {}
    con = duckdb.connect()
    con.register("decisions", table)
    rows = con.sql(
        "SELECT dataset, any_value(kind) AS kind, count(*) AS n, count(*) FILTER (WHERE dropped_by IS NULL) AS kept "
        "FROM decisions GROUP BY 1 ORDER BY 1"
    ).fetchall()
    for ds, kind, n, kept in rows:
        counts[ds] = {"kind": kind, "scored": n, "kept": kept, "dropped": {}}
    for ds, reason, n in con.sql(
        "SELECT dataset, dropped_by, count(*) FROM decisions WHERE dropped_by IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
    ).fetchall():
        counts[ds]["dropped"][reason] = n
    for ds, c in counts.items():
        assert c["kept"] + sum(c["dropped"].values()) == c["scored"], ds  # nothing dropped without a reason
    return SelectionResult(fp, compiled.sql, url, counts)
