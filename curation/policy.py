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
and drops some of them; the first rule that drops a sample is its reason. Ranking rules
(``top_fraction``, ``top_k``) rank the samples still kept, within their dataset, so the
union over datasets is NVILA's "top K within each sub-dataset". Samples that a scorer
could not score (``<scorer>_error`` set) are dropped first: reason ``unreadable`` when the sample could not
be read at all, ``scorer_error:<scorer>`` when one scorer failed on it (``drop_errors: false``
turns that off). Kept + dropped = scored, per dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("align", "vision_pretrain", "pretrain", "image_sft", "video_sft")


class PolicyError(ValueError):
    """A policy that cannot run; the message names the offending field."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None  # the reason recorded for samples this rule drops


class ThresholdRule(_Rule):
    rule: Literal["threshold"]
    column: str
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _bounds(self) -> "ThresholdRule":
        if self.min is None and self.max is None:
            raise ValueError("threshold needs min, max or both")
        return self


class ValidRule(_Rule):
    rule: Literal["valid"]
    decodable: bool = True
    min_size: Optional[int] = Field(None, ge=1)  # both sides at least this many pixels
    max_aspect_ratio: Optional[float] = Field(None, ge=1)
    min_caption_words: Optional[int] = Field(None, ge=0)
    max_caption_words: Optional[int] = Field(None, ge=1)
    min_caption_chars: Optional[int] = Field(None, ge=0)


class DedupRule(_Rule):
    rule: Literal["dedup"]
    column: str = "sha256"
    prefer: Optional[str] = None  # keep the duplicate with the highest value here (default: first by shard, key)


class NearDedupRule(_Rule):
    rule: Literal["near_dedup"]
    column: str = "phash"
    max_distance: int = Field(4, ge=0, le=15)  # Hamming distance between 64-bit hashes
    prefer: Optional[str] = None


class TopFractionRule(_Rule):
    rule: Literal["top_fraction"]
    column: str
    fraction: float
    ascending: bool = False  # keep the lowest values instead

    @field_validator("fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {v}")
        return v


class TopKRule(_Rule):
    rule: Literal["top_k"]
    column: str
    k: Optional[int] = Field(None, ge=1)
    fraction: Optional[float] = None  # k as a fraction of the samples still kept
    ascending: bool = False

    @model_validator(mode="after")
    def _one(self) -> "TopKRule":
        if (self.k is None) == (self.fraction is None):
            raise ValueError("top_k needs exactly one of k or fraction")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        return self


class SqlRule(_Rule):
    rule: Literal["sql"]
    keep_where: str  # a DuckDB predicate over the score columns; rows where it is not true are dropped


Rule = Annotated[Union[ThresholdRule, ValidRule, DedupRule, NearDedupRule, TopFractionRule, TopKRule, SqlRule],
                 Field(discriminator="rule")]


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


def _format(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in (
            "threshold", "valid", "dedup", "near_dedup", "top_fraction", "top_k", "sql")))
        parts.append(f"{loc}: {err['msg']}")
    return "invalid policy: " + "; ".join(parts)


def load_policy(path_or_dict: str | dict[str, Any]) -> Policy:
    if isinstance(path_or_dict, str):
        if not os.path.exists(path_or_dict):
            raise PolicyError(f"policy file not found: {path_or_dict}")
        with open(path_or_dict) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise PolicyError(f"policy {path_or_dict} is not valid YAML: {e}") from None
    else:
        data = path_or_dict
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(_format(e)) from None


# --------------------------------------------------------------------------- compile


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _num(x: float) -> str:
    return repr(float(x))


def _rule_label(rule: Any, i: int) -> str:
    if rule.name:
        return rule.name
    if isinstance(rule, ThresholdRule):
        parts = []
        if rule.min is not None:
            parts.append(f">={rule.min:g}")
        if rule.max is not None:
            parts.append(f"<={rule.max:g}")
        return f"threshold:{rule.column}{''.join(parts)}"
    if isinstance(rule, (DedupRule, NearDedupRule, TopFractionRule, TopKRule)):
        return f"{rule.rule}:{rule.column}"
    if isinstance(rule, SqlRule):
        return f"sql:{i}"
    return rule.rule


def rule_columns(rule: Any) -> list[str]:
    if isinstance(rule, (ThresholdRule, DedupRule, NearDedupRule, TopFractionRule, TopKRule)):
        cols = [rule.column]
        if getattr(rule, "prefer", None):
            cols.append(rule.prefer)
        return cols
    if isinstance(rule, ValidRule):
        cols = []
        if rule.decodable:
            cols.append("decodable")
        if rule.min_size is not None:
            cols += ["width", "height"]
        if rule.max_aspect_ratio is not None:
            cols.append("aspect_ratio")
        if rule.min_caption_words is not None or rule.max_caption_words is not None:
            cols.append("caption_words")
        if rule.min_caption_chars is not None:
            cols.append("caption_chars")
        return cols
    return []


class _Chain:
    """Builds the CTE chain of one dataset: s0 -> s1 -> ... each marking dropped_by."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ctes: list[tuple[str, str]] = []
        self.n = 0

    def add(self, body: str) -> None:
        self.n += 1
        self.ctes.append((self.prev, body))

    def mark(self, reason: str, drop_when: str) -> None:
        """Drop kept rows for which ``drop_when`` is true (NULL counts as not dropped: callers coalesce)."""
        self.add(f"SELECT * REPLACE (CASE WHEN dropped_by IS NULL AND ({drop_when}) THEN {_lit(reason)} "
                 f"ELSE dropped_by END AS dropped_by) FROM {self.prev}")

    @property
    def prev(self) -> str:
        """The newest CTE: what the next step reads."""
        return f"{self.prefix}{self.n}"


def _order(prefer: str | None) -> str:
    base = "shard, key"
    return f"{_q(prefer)} DESC NULLS LAST, {base}" if prefer else base


def compile_dataset(dataset: str, rules: list[Any], error_columns: list[str], prefix: str) -> _Chain:
    ch = _Chain(prefix)
    ch.ctes.append((f"{prefix}0", f"SELECT *, CAST(NULL AS VARCHAR) AS dropped_by FROM scores WHERE dataset = {_lit(dataset)}"))
    if error_columns:
        if "basic_error" in error_columns:
            # unreadable input (the reader's error, recorded by the basic scorer)
            ch.mark("unreadable", "basic_error IS NOT NULL")
        for c in error_columns:
            if c == "basic_error":
                continue
            scorer = c[: -len("_error")] if c.endswith("_error") else "scorer"
            ch.mark(f"scorer_error:{scorer}", f"{_q(c)} IS NOT NULL")
    for i, rule in enumerate(rules):
        label = _rule_label(rule, i)
        if isinstance(rule, ThresholdRule):
            conds = []
            if rule.min is not None:
                conds.append(f"{_q(rule.column)} >= {_num(rule.min)}")
            if rule.max is not None:
                conds.append(f"{_q(rule.column)} <= {_num(rule.max)}")
            ch.mark(label, f"NOT coalesce({' AND '.join(conds)}, false)")
        elif isinstance(rule, ValidRule):
            base = rule.name or "valid"
            if rule.decodable:
                ch.mark(f"{base}:decodable", "NOT coalesce(decodable, false)")
            if rule.min_size is not None:
                ch.mark(f"{base}:min_size", f"NOT coalesce(width >= {rule.min_size} AND height >= {rule.min_size}, false)")
            if rule.max_aspect_ratio is not None:
                ch.mark(f"{base}:max_aspect_ratio", f"NOT coalesce(aspect_ratio <= {_num(rule.max_aspect_ratio)}, false)")
            if rule.min_caption_words is not None:
                ch.mark(f"{base}:min_caption_words", f"NOT coalesce(caption_words >= {rule.min_caption_words}, false)")
            if rule.max_caption_words is not None:
                ch.mark(f"{base}:max_caption_words", f"NOT coalesce(caption_words <= {rule.max_caption_words}, false)")
            if rule.min_caption_chars is not None:
                ch.mark(f"{base}:min_caption_chars", f"NOT coalesce(caption_chars >= {rule.min_caption_chars}, false)")
        elif isinstance(rule, DedupRule):
            prev = ch.prev
            ch.add(
                f"SELECT * EXCLUDE (_rn) REPLACE (CASE WHEN dropped_by IS NULL AND _rn > 1 THEN {_lit(label)} "
                f"ELSE dropped_by END AS dropped_by) FROM (SELECT *, CASE WHEN dropped_by IS NULL AND {_q(rule.column)} "
                f"IS NOT NULL THEN row_number() OVER (PARTITION BY dropped_by IS NULL, {_q(rule.column)} ORDER BY "
                f"{_order(rule.prefer)}) END AS _rn FROM {prev})"
            )
        elif isinstance(rule, NearDedupRule):
            prev = ch.prev
            d = rule.max_distance
            nb = d + 1  # pigeonhole: two hashes within distance d agree on at least one of d+1 bands
            width = 64 // nb
            bands = []
            for b in range(nb):
                shift = b * width
                bits = 64 - shift if b == nb - 1 else width
                mask = (1 << bits) - 1
                bands.append(f"SELECT shard, key, _h, _rank, {b} AS band, (_h >> {shift}) & {mask}::UBIGINT AS val FROM _alive")
            alive = (f"SELECT shard, key, ('0x' || {_q(rule.column)})::UBIGINT AS _h, row_number() OVER (ORDER BY "
                     f"{_order(rule.prefer)}) AS _rank FROM {prev} WHERE dropped_by IS NULL AND {_q(rule.column)} IS NOT NULL")
            near = (
                f"SELECT DISTINCT a.shard, a.key FROM _bands a JOIN _bands b ON a.band = b.band AND a.val = b.val "
                f"AND b._rank < a._rank WHERE bit_count(xor(a._h, b._h)) <= {d}"
            )
            ch.add(
                f"WITH _alive AS ({alive}), _bands AS ({' UNION ALL '.join(bands)}), _near AS ({near}) "
                f"SELECT p.* REPLACE (CASE WHEN p.dropped_by IS NULL AND n.key IS NOT NULL THEN {_lit(label)} "
                f"ELSE p.dropped_by END AS dropped_by) FROM {prev} p LEFT JOIN _near n ON p.shard = n.shard AND p.key = n.key"
            )
        elif isinstance(rule, (TopFractionRule, TopKRule)):
            prev = ch.prev
            direction = "ASC" if rule.ascending else "DESC"
            if isinstance(rule, TopKRule) and rule.k is not None:
                limit = str(int(rule.k))
            else:
                limit = f"ceil({_num(rule.fraction)} * _alive)"
            ch.add(
                f"SELECT * EXCLUDE (_rk, _alive) REPLACE (CASE WHEN dropped_by IS NULL AND (_rk > {limit} OR "
                f"{_q(rule.column)} IS NULL) THEN {_lit(label)} ELSE dropped_by END AS dropped_by) FROM (SELECT *, "
                f"row_number() OVER (PARTITION BY dropped_by IS NULL ORDER BY {_q(rule.column)} {direction} NULLS LAST, "
                f"shard, key) AS _rk, count(*) FILTER (WHERE dropped_by IS NULL) OVER () AS _alive FROM {prev})"
            )
        elif isinstance(rule, SqlRule):
            ch.mark(label, f"NOT coalesce(({rule.keep_where}), false)")
    return ch


@dataclass
class CompiledPolicy:
    sql: str
    datasets: list[str]
    columns: list[str] = field(default_factory=list)


def compile_policy(policy: Policy, datasets: list[str], columns: list[str]) -> CompiledPolicy:
    """One DuckDB query over the ``scores`` view returning (dataset, shard, key, kind, dropped_by)."""
    cols = set(columns)
    errors = []
    for ds in policy.datasets:
        if ds not in datasets:
            errors.append(f"datasets.{ds}: no scores for dataset {ds!r} (scored datasets: {', '.join(datasets)})")
    for stage, mix in policy.stages.items():
        for ds in mix:
            if ds not in datasets:
                errors.append(f"stages.{stage}.{ds}: no scores for dataset {ds!r}")
    for where, rules in [("defaults", policy.defaults)] + [(f"datasets.{d}", r) for d, r in policy.datasets.items()]:
        for i, rule in enumerate(rules):
            for c in rule_columns(rule):
                if c not in cols:
                    errors.append(f"{where}[{i}]: unknown column {c!r} (score columns: {', '.join(sorted(cols))})")
    if errors:
        raise PolicyError("invalid policy: " + "; ".join(errors))
    error_cols = [c for c in columns if c == "error" or c.endswith("_error")] if policy.drop_errors else []
    parts, ctes = [], []
    for j, ds in enumerate(sorted(datasets)):
        ch = compile_dataset(ds, policy.rules_for(ds), error_cols, f"d{j}_s")
        ctes.extend(ch.ctes)
        parts.append(f"SELECT dataset, shard, key, kind, dropped_by FROM {ch.prev}")
    body = ",\n".join(f"{name} AS (\n  {sql}\n)" for name, sql in ctes)
    sql = f"WITH\n{body}\n" + "\nUNION ALL\n".join(parts) + "\nORDER BY dataset, shard, key"
    return CompiledPolicy(sql, sorted(datasets), list(columns))


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
    import io as _io

    import duckdb
    import pyarrow.parquet as pq

    from curation import io as cio

    datasets = [r[0] for r in store.con.execute("SELECT DISTINCT dataset FROM scores ORDER BY 1").fetchall()]
    if not datasets:
        raise PolicyError(f"no scored samples under {store.root}")
    compiled = compile_policy(policy, datasets, store.columns())
    try:
        table = store.con.sql(compiled.sql).to_arrow_table()
    except duckdb.Error as e:
        raise PolicyError(f"policy does not run against the score store: {e}") from None
    fp = policy.fingerprint()
    url = out or cio.join(store.work, "selection", fp, "decisions.parquet")
    buf = _io.BytesIO()
    pq.write_table(table, buf)
    cio.write_bytes(url, buf.getvalue(), store.storage_options)
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
