"""Selection rules: each one a class that owns its YAML fields, the score columns it reads, the
reason it records, and the SQL step that drops samples.

A rule is a pydantic model (its fields are what a policy YAML writes under ``rule: <name>``):

- ``columns(all_columns)``: the score columns it reads (checked against the store before any
  query runs, and the only columns the sandboxed query may read);
- ``label(i)``: the reason recorded in ``dropped_by`` for the samples it drops (``name:`` in
  the YAML overrides it);
- ``apply(chain, label)``: appends its step to the dataset's CTE chain (:class:`Chain`), marking
  ``dropped_by`` on rows it drops among those still kept.

``early = True`` rules (``valid``) run before scorer errors are counted, so a sample is dropped
for its cause (an empty caption), not for the scorer error that cause produces downstream.
Adding a rule is adding one class here, decorated with :func:`register`: policies accept it,
the compiler runs it, its reason shows in ``curate select --explain``."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curation.selection.sqlsafe import ident as q
from curation.selection.sqlsafe import literal as lit


def num(x: float) -> str:
    return repr(float(x))


class Chain:
    """The steps of a selection, each a table made from the one before (``s0`` -> ``s1`` -> ...),
    every step marking ``dropped_by`` on rows it drops among those still kept.

    Steps are materialized one by one (``curation.selection.runner``), so each rule's plan is the
    plan of one statement over a table: a ranking sorts once, whatever came before it. While
    ``dataset`` is set, a rule sees only that dataset's rows (``source()``) and ``add`` keeps the
    other rows as they are; while it is None, a rule sees every dataset and works within each
    (``by_dataset()``), unless it is global. Consecutive marks are fused into one step."""

    def __init__(self, rows: int = 0, keyed: set[str] | None = None) -> None:
        self.steps: list[tuple[str, str]] = []  # (table, SELECT): chain steps and helper tables, in order
        self.n = 0
        self.rows = rows  # how many rows the selection starts from (sizes near_dedup's index)
        self.dataset: str | None = None
        self._marks: list[tuple[str, str]] = []  # pending (reason SQL, condition)
        self._helpers = 0
        self.in_order: set[str] = set()  # steps that keep their source's row order (marks: no join, no window)
        self.keyed = set(keyed or ())  # columns s0 holds as their 64-bit key, values in table keyed_values(c)

    @property
    def prev(self) -> str:
        """The newest step's table."""
        return f"s{self.n}"

    def source(self) -> str:
        """What the next step reads: the newest table (this dataset's rows only while one is set)."""
        self.flush()
        return self.prev if self.dataset is None else f"(SELECT * FROM {self.prev} WHERE dataset = {lit(self.dataset)})"

    def by_dataset(self) -> list[str]:
        """PARTITION BY columns that keep a rule within each dataset."""
        return ["dataset"] if self.dataset is None else []

    def add(self, body: str) -> None:
        """A step whose SELECT ``body`` reads :meth:`source` (called before building ``body``)."""
        if self.dataset is not None:
            body = f"SELECT * FROM {self.prev} WHERE dataset <> {lit(self.dataset)} UNION ALL BY NAME {body}"
        self.n += 1
        self.steps.append((self.prev, body))

    def drop_rows(self, rows: str, label_sql: str) -> None:
        """A step that drops, as ``label_sql``, the kept rows whose ``_rid`` is in table ``rows``."""
        src = self.source()
        self.add(f"SELECT p.* REPLACE (CASE WHEN p.dropped_by IS NULL AND n._rid IS NOT NULL THEN {label_sql} "
                 f"ELSE p.dropped_by END AS dropped_by) FROM {src} p LEFT JOIN {rows} n ON p._rid = n._rid")

    def helper(self, body: str) -> str:
        """A helper table (not a step); returns its name."""
        self.flush()
        self._helpers += 1
        name = f"h{self._helpers}"
        self.steps.append((name, body))
        return name

    def mark(self, reason: str, drop_when: str) -> None:
        """Drop kept rows for which ``drop_when`` is true (NULL counts as not dropped: callers coalesce)."""
        self.mark_sql(lit(reason), drop_when)

    def mark_sql(self, reason_sql: str, drop_when: str) -> None:
        if self.dataset is not None:
            drop_when = f"dataset = {lit(self.dataset)} AND ({drop_when})"
        self._marks.append((reason_sql, drop_when))

    def flush(self) -> None:
        if not self._marks:
            return
        whens = " ".join(f"WHEN {cond} THEN {reason}" for reason, cond in self._marks)
        self._marks = []
        body = (f"SELECT * REPLACE (CASE WHEN dropped_by IS NOT NULL THEN dropped_by {whens} ELSE NULL END "
                f"AS dropped_by) FROM {self.prev}")
        self.n += 1
        self.steps.append((self.prev, body))
        self.in_order.add(self.prev)


def keyed_values(column: str) -> str:
    return q(f"_values_{column}")  # a keyed column's side table: (_rid, _v) of rows whose key repeats


def rank_order(prefer: str | None, datasets: list[str] | None = None) -> str:
    """Which sample of a group is kept: the first of ``datasets`` (global rules), then the highest
    ``prefer``, then the first by (dataset, shard, key)."""
    first = ""
    if datasets:
        whens = " ".join(f"WHEN {lit(d)} THEN {i}" for i, d in enumerate(datasets))
        first = f"CASE dataset {whens} ELSE {len(datasets)} END, "
    base = "dataset, shard, key"
    return first + (f"{q(prefer)} DESC NULLS LAST, {base}" if prefer else base)


class SelectionRule(BaseModel):
    """What every rule shares; subclasses add their fields and the three methods."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None  # the reason recorded for samples this rule drops
    early: ClassVar[bool] = False

    def columns(self, all_columns: list[str]) -> list[str]:
        return [self.column] + ([self.prefer] if getattr(self, "prefer", None) else [])  # type: ignore[attr-defined]

    def label(self, i: int) -> str:
        return self.name or f"{self.rule}:{self.column}"  # type: ignore[attr-defined]

    def apply(self, chain: Chain, label: str) -> None:
        raise NotImplementedError


RULE_CLASSES: list[type[SelectionRule]] = []


def register(cls: type[SelectionRule]) -> type[SelectionRule]:
    RULE_CLASSES.append(cls)
    return cls


class Calibration(BaseModel):
    """Where a calibrated threshold came from (``curation.selection.calibrate``): recorded, not used."""

    model_config = ConfigDict(extra="forbid")
    trusted: str  # the trusted shards the scores came from
    column: str
    quantile: float = Field(ge=0, lt=1)
    samples: int = Field(ge=1)
    value: float  # the quantile before rounding


@register
class ThresholdRule(SelectionRule):
    rule: Literal["threshold"]
    column: str
    min: Optional[float] = None
    max: Optional[float] = None
    calibration: Optional[Calibration] = None

    @model_validator(mode="after")
    def _bounds(self) -> "ThresholdRule":
        if self.min is None and self.max is None:
            raise ValueError("threshold needs min, max or both")
        return self

    def label(self, i: int) -> str:
        lo = f">={self.min:g}" if self.min is not None else ""
        hi = f"<={self.max:g}" if self.max is not None else ""
        return self.name or f"threshold:{self.column}{lo}{hi}"

    def apply(self, chain: Chain, label: str) -> None:
        conds = []
        if self.min is not None:
            conds.append(f"{q(self.column)} >= {num(self.min)}")
        if self.max is not None:
            conds.append(f"{q(self.column)} <= {num(self.max)}")
        chain.mark(label, f"NOT coalesce({' AND '.join(conds)}, false)")


@register
class ValidRule(SelectionRule):
    rule: Literal["valid"]
    decodable: bool = True
    min_size: Optional[int] = Field(None, ge=1)  # both sides at least this many pixels
    max_aspect_ratio: Optional[float] = Field(None, ge=1)
    min_caption_words: Optional[int] = Field(None, ge=0)
    max_caption_words: Optional[int] = Field(None, ge=1)
    min_caption_chars: Optional[int] = Field(None, ge=0)
    early: ClassVar[bool] = True

    def _checks(self) -> list[tuple[str, list[str], str]]:
        """(check, columns read, SQL that keeps) for each check this rule sets."""
        checks = [("decodable", ["decodable"], "decodable")] if self.decodable else []
        if self.min_size is not None:
            checks.append(("min_size", ["width", "height"], f"width >= {self.min_size} AND height >= {self.min_size}"))
        if self.max_aspect_ratio is not None:
            checks.append(("max_aspect_ratio", ["aspect_ratio"], f"aspect_ratio <= {num(self.max_aspect_ratio)}"))
        if self.min_caption_words is not None:
            checks.append(("min_caption_words", ["caption_words"], f"caption_words >= {self.min_caption_words}"))
        if self.max_caption_words is not None:
            checks.append(("max_caption_words", ["caption_words"], f"caption_words <= {self.max_caption_words}"))
        if self.min_caption_chars is not None:
            checks.append(("min_caption_chars", ["caption_chars"], f"caption_chars >= {self.min_caption_chars}"))
        return checks

    def columns(self, all_columns: list[str]) -> list[str]:
        return list(dict.fromkeys(c for _, cols, _ in self._checks() for c in cols))

    def label(self, i: int) -> str:
        return self.name or "valid"  # each check appends ':<check>'

    def apply(self, chain: Chain, label: str) -> None:
        for check, _, keep in self._checks():
            chain.mark(f"{label}:{check}", f"NOT coalesce({keep}, false)")


class _DedupBase(SelectionRule):
    prefer: Optional[str] = None  # keep the duplicate with the highest value here (default: first by shard, key)
    scope: Literal["dataset", "global"] = "dataset"  # global: one copy across datasets (in defaults only)
    prefer_datasets: list[str] = Field(default_factory=list)  # global: keep the copy of the first of these

    @model_validator(mode="after")
    def _scope(self) -> "_DedupBase":
        if self.prefer_datasets and self.scope != "global":
            raise ValueError("prefer_datasets orders datasets for scope: global only")
        return self

    def order(self) -> str:
        return rank_order(self.prefer, self.prefer_datasets if self.scope == "global" else None)

    def partition(self, chain: Chain) -> list[str]:
        return [] if self.scope == "global" else chain.by_dataset()


@register
class DedupRule(_DedupBase):
    rule: Literal["dedup"]
    column: str = "sha256"
    key_sql: ClassVar[str] = "hash({})"  # the fixed-width key of (partition, value): equal values, equal keys

    def apply(self, chain: Chain, label: str) -> None:
        """Drop every kept row but the first (by :meth:`order`) of each group of equal values. No sort
        of the pool: a hash aggregate on a 64-bit key finds keys that repeat; only rows with such a
        key are ranked, partitioned by the value itself, so a key collision never drops a row."""
        col = q(self.column)
        src = chain.source()
        part = self.partition(chain)
        key = self.key_sql.format(", ".join(part + [col]))
        alive = f"dropped_by IS NULL AND {col} IS NOT NULL"
        shared = chain.helper(f"SELECT {key} AS _k FROM {src} WHERE {alive} GROUP BY _k HAVING count(*) > 1")
        if self.column in chain.keyed:  # s0 holds the key; the values of rows whose key repeats are aside
            value, rows = "v._v", f"{src} s JOIN {keyed_values(self.column)} v ON s._rid = v._rid"
        else:
            value, rows = col, f"{src} s"
        drops = chain.helper(
            f"SELECT _rid FROM (SELECT s._rid, row_number() OVER (PARTITION BY {', '.join(part + [value])} ORDER BY "
            f"{self.order()}) AS _rn FROM {rows} WHERE {alive} AND {key} IN (SELECT _k FROM {shared})) WHERE _rn > 1")
        chain.drop_rows(drops, lit(label))


@register
class NearDedupRule(_DedupBase):
    rule: Literal["near_dedup"]
    column: str = "phash"
    max_distance: int = Field(4, ge=0, le=15)  # Hamming distance between 64-bit hashes
    blocks: Optional[int] = Field(None, ge=1, le=64)  # force the index's block count (default: sized to the pool)

    @model_validator(mode="after")
    def _blocks(self) -> "NearDedupRule":
        if self.blocks is not None and self.blocks <= self.max_distance:
            raise ValueError(f"blocks must be more than max_distance ({self.max_distance}), got {self.blocks}")
        return self

    def apply(self, chain: Chain, label: str) -> None:
        from curation.selection.near_dedup import near_dedup_steps

        near_dedup_steps(chain, self.column, self.max_distance, self.order(), lit(label), self.scope == "global",
                         self.blocks)


@register
class SemanticDedupRule(SelectionRule):
    """SemDeDup: cosine >= threshold between stored embeddings, pairs sought within k-means clusters
    (``curation.selection.semantic_dedup``); one sample of each linked group is kept, as near_dedup."""

    rule: Literal["semantic_dedup"]
    column: str = "clip_image_emb"
    threshold: float = Field(0.95, gt=0, le=1)
    clusters: int = Field(100, ge=1)
    probes: int = Field(2, ge=1, le=8)  # clusters each embedding joins
    seed: int = 0
    prefer: Optional[str] = None

    def columns(self, all_columns: list[str]) -> list[str]:
        return [self.prefer] if self.prefer else []  # embeddings are read before the query, not inside it

    def apply(self, chain: Chain, label: str) -> None:
        from curation.selection.semantic_dedup import semantic_dedup_step, table_name

        src = chain.source()  # pending marks flushed; this dataset's rows while one is set
        step = semantic_dedup_step(src, table_name(self), rank_order(self.prefer), lit(label))
        chain.add(f"SELECT * FROM ({step})")  # a WITH query: a subquery where add() unions it with other datasets


class _RankingRule(SelectionRule):
    column: str
    ascending: bool = False  # keep the lowest values instead

    def _limit(self) -> str:
        raise NotImplementedError

    def apply(self, chain: Chain, label: str) -> None:
        """Drop the kept rows past the limit, or with no value: only kept rows' ranking columns are sorted."""
        direction = "ASC" if self.ascending else "DESC"
        src = chain.source()
        part = chain.by_dataset()
        over = f"PARTITION BY {', '.join(part)}" if part else ""
        col = q(self.column)
        drops = chain.helper(
            f"SELECT _rid FROM (SELECT _rid, {col}, row_number() OVER ({over} ORDER BY {col} {direction} NULLS LAST, "
            f"shard, key) AS _rk, count(*) OVER ({over}) AS _alive FROM (SELECT _rid, {', '.join(part + [col])}, shard, "
            f"key FROM {src} WHERE dropped_by IS NULL)) WHERE _rk > {self._limit()} OR {col} IS NULL")
        chain.drop_rows(drops, lit(label))


@register
class TopFractionRule(_RankingRule):
    rule: Literal["top_fraction"]
    fraction: float

    @field_validator("fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {v}")
        return v

    def _limit(self) -> str:
        return f"ceil({num(self.fraction)} * _alive)"


@register
class TopKRule(_RankingRule):
    rule: Literal["top_k"]
    k: Optional[int] = Field(None, ge=1)
    fraction: Optional[float] = None  # k as a fraction of the samples still kept

    @model_validator(mode="after")
    def _one(self) -> "TopKRule":
        if (self.k is None) == (self.fraction is None):
            raise ValueError("top_k needs exactly one of k or fraction")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        return self

    def _limit(self) -> str:
        return str(int(self.k)) if self.k is not None else f"ceil({num(self.fraction)} * _alive)"


@register
class SqlRule(SelectionRule):
    rule: Literal["sql"]
    keep_where: str  # a DuckDB predicate over the score columns; rows where it is not true are dropped

    @field_validator("keep_where")
    @classmethod
    def _one_expression(cls, v: str) -> str:
        from curation.selection.sqlsafe import check_predicate

        try:
            check_predicate(v)
        except ValueError as e:
            raise ValueError(f"keep_where must be one SQL expression over the score columns: {e}") from None
        return v

    def columns(self, all_columns: list[str]) -> list[str]:
        """The columns the predicate names (all of them when it cannot tell); unknown names fail
        when the query runs, with DuckDB's message."""
        from curation.selection.sqlsafe import check_predicate

        names = check_predicate(self.keep_where)
        return list(all_columns) if names is None else [c for c in names if c in all_columns]

    def label(self, i: int) -> str:
        return self.name or f"sql:{i}"

    def apply(self, chain: Chain, label: str) -> None:
        chain.mark(label, f"NOT coalesce(({self.keep_where}), false)")  # checked at load: one expression


RULE_NAMES = tuple(c.model_fields["rule"].annotation.__args__[0] for c in RULE_CLASSES)
Rule = Annotated[Union[tuple(RULE_CLASSES)], Field(discriminator="rule")]  # type: ignore[valid-type]
