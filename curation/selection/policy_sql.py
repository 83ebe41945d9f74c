"""A selection policy compiled to one DuckDB query over the ``scores`` table.

Each dataset gets a chain of CTEs (``curation.selection.rules.Chain``), one step per rule, each
marking ``dropped_by`` on the rows it drops among those still kept; every rule writes its own
step (``curation.selection.rules``). The order within a dataset: unreadable samples first,
then ``early`` rules (validity: they name a cause before the scorer error it produces), then
scorer errors, then every other rule in the policy's order.

Names are always quoted identifiers and values quoted literals or numbers; the only text taken
from the policy as SQL is a ``sql`` rule's ``keep_where``, which
:func:`curation.selection.sqlsafe.check_predicate` has checked at load to be one expression with
no subquery, and which runs in :func:`curation.selection.sqlsafe.sandbox`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curation.selection.policy import Policy, PolicyError
from curation.selection.rules import Chain
from curation.selection.sqlsafe import ident as q
from curation.selection.sqlsafe import literal as lit


def compile_dataset(dataset: str, rules: list[Any], error_columns: list[str], prefix: str) -> Chain:
    ch = Chain(prefix)
    ch.ctes.append((f"{prefix}0", f"SELECT *, CAST(NULL AS VARCHAR) AS dropped_by FROM scores WHERE dataset = {lit(dataset)}"))
    if "basic_error" in error_columns:
        ch.mark("unreadable", "basic_error IS NOT NULL")  # unreadable input (the reader's error, as basic recorded it)
    for i, rule in enumerate(rules):
        if rule.early:
            rule.apply(ch, rule.label(i))
    for c in error_columns:
        if c != "basic_error":
            ch.mark(f"scorer_error:{c[: -len('_error')] if c.endswith('_error') else 'scorer'}", f"{q(c)} IS NOT NULL")
    for i, rule in enumerate(rules):
        if not rule.early:
            rule.apply(ch, rule.label(i))
    return ch


@dataclass
class CompiledPolicy:
    sql: str
    datasets: list[str]
    columns: list[str] = field(default_factory=list)  # the score columns the query reads


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


def compile_policy(policy: Policy, datasets: list[str], columns: list[str]) -> CompiledPolicy:
    """One DuckDB query over the ``scores`` table returning (dataset, shard, key, kind, dropped_by)."""
    _check_names(policy, datasets, columns)
    error_cols = [c for c in columns if c == "error" or c.endswith("_error")] if policy.drop_errors else []
    parts, ctes = [], []
    for j, ds in enumerate(sorted(datasets)):
        ch = compile_dataset(ds, policy.rules_for(ds), error_cols, f"d{j}_s")
        ctes.extend(ch.ctes)
        parts.append(f"SELECT dataset, shard, key, kind, dropped_by FROM {ch.prev}")
    body = ",\n".join(f"{name} AS (\n  {sql}\n)" for name, sql in ctes)
    sql = f"WITH\n{body}\n" + "\nUNION ALL\n".join(parts) + "\nORDER BY dataset, shard, key"
    return CompiledPolicy(sql, sorted(datasets), _needed(policy, columns, error_cols))
