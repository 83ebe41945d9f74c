"""A selection policy compiled to one DuckDB query over the ``scores`` table.

Each dataset gets a chain of CTEs, one step per rule, each marking ``dropped_by`` on the
rows it drops among those still kept. Names are always quoted identifiers and values quoted
literals or numbers; the only text taken from the policy as SQL is a ``sql`` rule's
``keep_where``, which :func:`curation.selection.sqlsafe.check_predicate` has checked at load to be one
expression with no subquery, and which runs in :func:`curation.selection.sqlsafe.sandbox`.

``near_dedup`` links every two samples whose 64-bit hashes differ in at most
``max_distance`` bits and keeps exactly one sample of each connected group (so a chain
a~b~c or a star around one hub keeps one, even where the ends are far apart): the one
ranked first by ``prefer`` (highest first, when given), then by ``(shard, key)``. Near pairs
are found through bands (pigeonhole: two hashes within distance d agree on at least one of
d+1 bands), groups by min-label propagation in a recursive CTE (``USING KEY``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curation.selection.policy import (DedupRule, NearDedupRule, Policy, PolicyError, SqlRule, ThresholdRule, TopFractionRule,
                             TopKRule, ValidRule)
from curation.selection.sqlsafe import ident as _q
from curation.selection.sqlsafe import literal as _lit


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
    """The score columns a rule reads by name (a ``sql`` rule's are checked when it runs)."""
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


def _valid(ch: _Chain, rule: ValidRule) -> None:
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


def _threshold(ch: _Chain, rule: ThresholdRule, label: str) -> None:
    conds = []
    if rule.min is not None:
        conds.append(f"{_q(rule.column)} >= {_num(rule.min)}")
    if rule.max is not None:
        conds.append(f"{_q(rule.column)} <= {_num(rule.max)}")
    ch.mark(label, f"NOT coalesce({' AND '.join(conds)}, false)")


def _dedup(ch: _Chain, rule: DedupRule, label: str) -> None:
    ch.add(
        f"SELECT * EXCLUDE (_rn) REPLACE (CASE WHEN dropped_by IS NULL AND _rn > 1 THEN {_lit(label)} "
        f"ELSE dropped_by END AS dropped_by) FROM (SELECT *, CASE WHEN dropped_by IS NULL AND {_q(rule.column)} "
        f"IS NOT NULL THEN row_number() OVER (PARTITION BY dropped_by IS NULL, {_q(rule.column)} ORDER BY "
        f"{_order(rule.prefer)}) END AS _rn FROM {ch.prev})"
    )


def _near_dedup(ch: _Chain, rule: NearDedupRule, label: str) -> None:
    """Keep the first-ranked sample of each connected group of near duplicates (module docstring)."""
    d = rule.max_distance
    nb = d + 1
    width = 64 // nb
    bands = []
    for b in range(nb):
        shift = b * width
        mask = (1 << (64 - shift if b == nb - 1 else width)) - 1
        bands.append(f"SELECT _rank, _h, {b} AS band, (_h >> {shift}) & {mask}::UBIGINT AS val FROM _alive")
    alive = (f"SELECT shard, key, ('0x' || {_q(rule.column)})::UBIGINT AS _h, row_number() OVER (ORDER BY "
             f"{_order(rule.prefer)}) AS _rank FROM {ch.prev} WHERE dropped_by IS NULL AND {_q(rule.column)} IS NOT NULL")
    edges = (f"SELECT DISTINCT a._rank AS src, b._rank AS dst FROM _bands a JOIN _bands b ON a.band = b.band "
             f"AND a.val = b.val AND a._rank <> b._rank WHERE bit_count(xor(a._h, b._h)) <= {d}")
    # every node starts as its own group; a group label is lowered to the smallest rank it touches
    groups = ("SELECT _rank, _rank FROM _alive UNION SELECT e.dst, min(w.grp) FROM _groups w JOIN _edges e ON "
              "w.node = e.src JOIN recurring._groups r ON r.node = e.dst GROUP BY e.dst HAVING min(w.grp) < min(r.grp)")
    dropped = "SELECT a.shard, a.key FROM _alive a JOIN _groups g ON a._rank = g.node WHERE g.grp < a._rank"
    ch.add(
        f"WITH RECURSIVE _alive AS ({alive}), _bands AS ({' UNION ALL '.join(bands)}), _edges AS ({edges}), "
        f"_groups(node, grp) USING KEY (node) AS ({groups}), _near AS ({dropped}) "
        f"SELECT p.* REPLACE (CASE WHEN p.dropped_by IS NULL AND n.key IS NOT NULL THEN {_lit(label)} "
        f"ELSE p.dropped_by END AS dropped_by) FROM {ch.prev} p LEFT JOIN _near n ON p.shard = n.shard AND p.key = n.key"
    )


def _top(ch: _Chain, rule: TopFractionRule | TopKRule, label: str) -> None:
    direction = "ASC" if rule.ascending else "DESC"
    if isinstance(rule, TopKRule) and rule.k is not None:
        limit = str(int(rule.k))
    else:
        limit = f"ceil({_num(rule.fraction)} * _alive)"
    ch.add(
        f"SELECT * EXCLUDE (_rk, _alive) REPLACE (CASE WHEN dropped_by IS NULL AND (_rk > {limit} OR "
        f"{_q(rule.column)} IS NULL) THEN {_lit(label)} ELSE dropped_by END AS dropped_by) FROM (SELECT *, "
        f"row_number() OVER (PARTITION BY dropped_by IS NULL ORDER BY {_q(rule.column)} {direction} NULLS LAST, "
        f"shard, key) AS _rk, count(*) FILTER (WHERE dropped_by IS NULL) OVER () AS _alive FROM {ch.prev})"
    )


def compile_dataset(dataset: str, rules: list[Any], error_columns: list[str], prefix: str) -> _Chain:
    ch = _Chain(prefix)
    ch.ctes.append((f"{prefix}0", f"SELECT *, CAST(NULL AS VARCHAR) AS dropped_by FROM scores WHERE dataset = {_lit(dataset)}"))
    if "basic_error" in error_columns:
        ch.mark("unreadable", "basic_error IS NOT NULL")  # unreadable input (the reader's error, as basic recorded it)
    # validity reads only basic facts: it names the cause (an empty caption) before the scorer
    # error that cause produces downstream (DeltaLoss has no caption tokens to score)
    for rule in rules:
        if isinstance(rule, ValidRule):
            _valid(ch, rule)
    for c in error_columns:
        if c != "basic_error":
            ch.mark(f"scorer_error:{c[: -len('_error')] if c.endswith('_error') else 'scorer'}", f"{_q(c)} IS NOT NULL")
    for i, rule in enumerate(rules):
        label = _rule_label(rule, i)
        if isinstance(rule, ValidRule):
            continue  # applied above
        if isinstance(rule, ThresholdRule):
            _threshold(ch, rule, label)
        elif isinstance(rule, DedupRule):
            _dedup(ch, rule, label)
        elif isinstance(rule, NearDedupRule):
            _near_dedup(ch, rule, label)
        elif isinstance(rule, (TopFractionRule, TopKRule)):
            _top(ch, rule, label)
        elif isinstance(rule, SqlRule):
            ch.mark(label, f"NOT coalesce(({rule.keep_where}), false)")  # checked at load: one expression
    return ch


@dataclass
class CompiledPolicy:
    sql: str
    datasets: list[str]
    columns: list[str] = field(default_factory=list)  # the score columns the query reads


def _check_names(policy: Policy, datasets: list[str], cols: set[str]) -> None:
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


def _needed(policy: Policy, columns: list[str], error_cols: list[str]) -> list[str]:
    """The score columns the query reads: identity, errors, what the rules name."""
    from curation.selection.sqlsafe import check_predicate

    need = {"dataset", "shard", "key", "kind", *error_cols}
    for rule in list(policy.defaults) + [r for rs in policy.datasets.values() for r in rs]:
        need.update(rule_columns(rule))
        if isinstance(rule, SqlRule):
            names = check_predicate(rule.keep_where)
            need.update(columns if names is None else names)
    return [c for c in columns if c in need]


def compile_policy(policy: Policy, datasets: list[str], columns: list[str]) -> CompiledPolicy:
    """One DuckDB query over the ``scores`` table returning (dataset, shard, key, kind, dropped_by)."""
    _check_names(policy, datasets, set(columns))
    error_cols = [c for c in columns if c == "error" or c.endswith("_error")] if policy.drop_errors else []
    parts, ctes = [], []
    for j, ds in enumerate(sorted(datasets)):
        ch = compile_dataset(ds, policy.rules_for(ds), error_cols, f"d{j}_s")
        ctes.extend(ch.ctes)
        parts.append(f"SELECT dataset, shard, key, kind, dropped_by FROM {ch.prev}")
    body = ",\n".join(f"{name} AS (\n  {sql}\n)" for name, sql in ctes)
    sql = f"WITH\n{body}\n" + "\nUNION ALL\n".join(parts) + "\nORDER BY dataset, shard, key"
    return CompiledPolicy(sql, sorted(datasets), _needed(policy, columns, error_cols))
