"""A selection policy compiled to steps over the ``scores`` columns, each step one table.

Every rule writes its own step (``curation.selection.rules``), marking ``dropped_by`` on the rows
it drops among those still kept; the steps run one after the other, each materialized
(``curation.selection.runner``), so no step's plan depends on the ones before it. The order
within a dataset: unreadable samples first, then samples a scorer has no score file for (only
with ``allow_incomplete``), then ``early`` rules (validity: they name a cause before the scorer
error it produces), then scorer errors, then every other rule in the policy's order.

Names are always quoted identifiers and values quoted literals or numbers; the only text taken
from the policy as SQL is a ``sql`` rule's ``keep_where``, which
:func:`curation.selection.sqlsafe.check_predicate` has checked at load to be one expression with
no subquery, and which runs in :func:`curation.selection.sqlsafe.sandbox`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curation.scoring.store import VIEW_IDENTITY
from curation.selection.policy import Policy, PolicyError
from curation.selection.rules import Chain, DedupRule, keyed_values
from curation.selection.sqlsafe import ident as q
from curation.selection.sqlsafe import literal as lit


def _apply(ch: Chain, rules: list[tuple[int, Any]], early: bool) -> None:
    for i, rule in rules:
        if rule.early == early:
            rule.apply(ch, rule.label(i))


def compile_steps(policy: Policy, datasets: list[str], error_columns: list[str], rows: int = 0,
                  not_scored: bool = False, keyed: set[str] | None = None) -> Chain:
    """The steps over table ``s0`` (the score columns plus ``dropped_by``, and ``_not_scored``
    when ``not_scored``): unreadable, not scored, early rules, scorer errors, the other rules.
    ``defaults`` run on every dataset at once (each within its dataset unless global), then each
    dataset's own rules on its rows; within a dataset this is the policy's order. ``keyed``: the
    columns ``s0`` holds as their 64-bit key (:func:`keyed_columns`)."""
    ch = Chain(rows, keyed)
    if "basic_error" in error_columns:
        ch.mark("unreadable", "basic_error IS NOT NULL")  # unreadable input (the reader's error, as basic recorded it)
    if not_scored:
        ch.mark_sql("'not_scored:' || _not_scored", "_not_scored IS NOT NULL")
    own = {ds: list(enumerate(policy.datasets.get(ds, []), len(policy.defaults))) for ds in sorted(datasets)}
    defaults = list(enumerate(policy.defaults))
    for early in (True, False):
        if not early:
            for c in error_columns:
                if c != "basic_error":
                    ch.mark(f"scorer_error:{c[: -len('_error')] if c.endswith('_error') else 'scorer'}",
                            f"{q(c)} IS NOT NULL")
        ch.dataset = None
        _apply(ch, defaults, early)
        for ds, rules in own.items():
            ch.dataset = ds
            _apply(ch, rules, early)
        ch.dataset = None
    ch.flush()
    return ch


@dataclass
class CompiledPolicy:
    steps: list[tuple[str, str]]  # (table, SELECT), run in order; the last step's table holds the decisions
    final: str
    datasets: list[str]
    columns: list[str] = field(default_factory=list)  # the score columns the query reads
    scorers: list[str] = field(default_factory=list)  # the scorers whose columns the rules read
    in_order: set[str] = field(default_factory=set)  # steps whose rows come out in their source's order
    keyed: list[str] = field(default_factory=list)  # columns held as their key, values where keys repeat

    @property
    def sql(self) -> str:
        """The steps as one readable script (``curate select --explain``, the manifest)."""
        head = "".join(f"-- s0 holds {c} as hash({c}); {keyed_values(c)}(_rid, _v): the values whose hash repeats\n"
                       for c in self.keyed)
        return head + ";\n".join(f"CREATE TABLE {name} AS\n  {body}" for name, body in self.steps) + ";\n" + \
            f"SELECT dataset, shard, key, kind, dropped_by FROM {self.final} ORDER BY dataset, shard, key;"


def _all_rules(policy: Policy) -> list[tuple[str, list[Any]]]:
    return [("defaults", policy.defaults)] + [(f"datasets.{d}", r) for d, r in policy.datasets.items()]


def _check_names(policy: Policy, datasets: list[str], columns: list[str]) -> None:
    errors = []
    for ds in policy.datasets:
        if ds not in datasets:
            errors.append(f"datasets.{ds}: no scores for dataset {ds!r} (scored datasets: {', '.join(datasets)})")
    for stage, mix in policy.stages.items():
        for ds in mix:
            if ds not in datasets:
                errors.append(f"stages.{stage}.{ds}: no scores for dataset {ds!r}")
    for where, rules in _all_rules(policy):
        for i, rule in enumerate(rules):
            for c in rule.columns(columns):
                if c not in columns:
                    errors.append(f"{where}[{i}]: unknown column {c!r} (score columns: {', '.join(sorted(columns))})")
    if errors:
        raise PolicyError("invalid policy: " + "; ".join(errors))


def _needed(policy: Policy, columns: list[str], error_cols: list[str]) -> list[str]:
    """The score columns the query reads: identity, errors, what the rules name."""
    need = {"dataset", "shard", "key", "kind", *error_cols}
    for _, rules in _all_rules(policy):
        for rule in rules:
            need.update(rule.columns(columns))
    return [c for c in columns if c in need]


def keyed_columns(policy: Policy, columns: list[str], error_cols: list[str]) -> set[str]:
    """Columns that only ``dedup`` rules read, as the values they compare (not as ``prefer``): the
    selection holds each as a 64-bit key (``hash``) and, in a side table, the values of the rows
    whose key repeats, which is all that dedup needs (a sha256 hex: 8 bytes a row, not 68)."""
    keyed, other = set(), set(VIEW_IDENTITY) | set(error_cols)
    for _, rules in _all_rules(policy):
        for r in rules:
            cols = r.columns(columns)
            if isinstance(r, DedupRule):
                keyed.add(r.column)
                cols = [c for c in cols if c != r.column]
            other.update(cols)
    return keyed - other


def compile_policy(policy: Policy, datasets: list[str], columns: list[str], rows: int = 0,
                   owners: dict[str, str] | None = None, not_scored: bool = False) -> CompiledPolicy:
    """The steps that turn the ``scores`` columns into decisions (dataset, shard, key, kind, dropped_by).
    ``rows`` sizes near_dedup's index; ``owners`` maps a score column to its scorer."""
    _check_names(policy, datasets, columns)
    error_cols = [c for c in columns if c == "error" or c.endswith("_error")] if policy.drop_errors else []
    keyed = keyed_columns(policy, columns, error_cols)
    ch = compile_steps(policy, datasets, error_cols, rows, not_scored, keyed)
    needed = _needed(policy, columns, error_cols)
    read = {c for _, rules in _all_rules(policy) for r in rules for c in r.columns(columns)}
    scorers = sorted({(owners or {}).get(c) for c in read} - {None})  # type: ignore[arg-type]
    return CompiledPolicy(ch.steps, ch.prev, sorted(datasets), needed, scorers, ch.in_order,
                          sorted(keyed))
