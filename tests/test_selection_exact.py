"""Selection's fast paths change no decision: dedup on a fixed-width key resolves key collisions
on the values themselves, and the load zips the scorers' files only when their rows line up (in
(dataset, shard, key) order, each key once), joining them otherwise."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.scale_store import write_store
from curation.scoring.store import ScoreStore
from curation.selection import runner
from curation.selection.policy import load_policy, run_selection
from curation.selection.policy_sql import compile_policy
from curation.selection.rules import DedupRule

RULES = [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 2}, {"rule": "dedup"},
         {"rule": "near_dedup", "max_distance": 4}, {"rule": "threshold", "column": "clip_score", "min": 0.2},
         {"rule": "top_k", "column": "delta_loss", "fraction": 0.5}]


def _rows(path: str) -> list[tuple]:
    t = pq.read_table(path)
    return list(zip(*(t.column(c).to_pylist() for c in ("dataset", "shard", "key", "kind", "dropped_by"))))


def _select(work: str, out: str, rules: list[dict]) -> list[tuple]:
    """The decision file's rows, in its order."""
    run_selection(ScoreStore(work), load_policy({"datasets": {"coyo": rules}}), out)
    return _rows(out)


def _expected_dedup(work: str, prefer: str | None) -> dict[tuple[str, str], str | None]:
    """Brute force: of each sha256 value, the row with the highest ``prefer`` (then the first by
    shard, key) is kept; every other row with that value is dropped."""
    basic, clip = ([r for f in sorted(glob.glob(os.path.join(work, "scores", s, "dataset=*", "*.parquet")))
                    for r in pq.read_table(f).to_pylist()] for s in ("basic", "clip"))
    clip = {(r["shard"], r["key"]): r for r in clip}
    first: dict[str, tuple] = {}
    for r in basic:
        p = clip[(r["shard"], r["key"])][prefer] if prefer else 0.0
        rank = (-p, r["shard"], r["key"])
        if r["sha256"] not in first or rank < first[r["sha256"]]:
            first[r["sha256"]] = rank
    return {(r["shard"], r["key"]): None if first[r["sha256"]][1:] == (r["shard"], r["key"]) else "dedup:sha256"
            for r in basic}


@pytest.mark.parametrize("prefer, keyed", [(None, True), ("clip_score", True), (None, False)])
def test_dedup_key_collisions_never_change_what_is_dropped(tmp_path, monkeypatch, prefer, keyed):
    """A key of 3 values (every group of duplicates collides with a third of the pool) drops exactly
    what the full 64-bit key drops, and what brute force over the sha256 values drops: with the
    sha256 held as its key (only dedup reads it) and as the value (a sql rule reads it too)."""
    work = str(tmp_path / "store")
    write_store(work, 6000, per_shard=2000, dup_rate=0.1)
    rules = [{"rule": "dedup", **({"prefer": prefer} if prefer else {})}]
    rules += [] if keyed else [{"rule": "sql", "keep_where": "length(sha256) = 64"}]
    compiled = compile_policy(load_policy({"datasets": {"coyo": rules}}), ["coyo"], ScoreStore(work).columns())
    assert compiled.keyed == (["sha256"] if keyed else [])
    full = _select(work, str(tmp_path / "full.parquet"), rules)
    monkeypatch.setattr(DedupRule, "key_sql", "(hash({}) % 3)")
    coarse = _select(work, str(tmp_path / "coarse.parquet"), rules)
    assert coarse == full
    got = {(sh, k): r for _, sh, k, _, r in full}
    assert got == _expected_dedup(work, prefer)
    assert 300 < sum(r is not None for r in got.values()) < 1000  # ~10 % planted copies


def _rewrite(work: str, scorer: str, order) -> None:
    """Rewrite every score file of ``scorer`` with its rows in ``order(n)`` (metadata kept)."""
    for path in sorted(glob.glob(os.path.join(work, "scores", scorer, "dataset=*", "*.parquet"))):
        t = pq.read_table(path)
        pq.write_table(t.take(order(t.num_rows)), path, compression="zstd")


@pytest.mark.parametrize("case", ["clip_shuffled", "all_reversed", "key_repeated"])
def test_load_zips_only_rows_that_line_up(tmp_path, monkeypatch, case):
    """The scorers' files zipped row by row give the decisions (same rows, same order in the file)
    that joining them gives; rows out of line (one scorer shuffled), out of (shard, key) order (every
    scorer reversed alike) or a key twice in a shard are joined instead, with the same decisions."""
    zipped: list[bool] = []
    real = runner._load_zipped
    monkeypatch.setattr(runner, "_load_zipped", lambda *a: zipped.append(real(*a)) or zipped[-1])
    work = str(tmp_path / "store")
    write_store(work, 8000, per_shard=2000)
    before = _select(work, str(tmp_path / "a.parquet"), RULES)
    assert zipped == [True]
    monkeypatch.setattr(runner, "_load_zipped", lambda *a: False)
    assert _select(work, str(tmp_path / "joined.parquet"), RULES) == before  # the join, forced
    monkeypatch.setattr(runner, "_load_zipped", lambda *a: zipped.append(real(*a)) or zipped[-1])
    if case == "clip_shuffled":
        _rewrite(work, "clip", lambda n: np.random.default_rng(0).permutation(n))
    elif case == "all_reversed":
        for scorer in ("basic", "clip", "deltaloss"):
            _rewrite(work, scorer, lambda n: np.arange(n)[::-1])
    else:  # each scorer's first row of a shard written twice: the join pairs the copies
        for scorer in ("basic", "clip", "deltaloss"):
            _rewrite(work, scorer, lambda n: np.r_[0, np.arange(n)])
    after = _select(work, str(tmp_path / "b.parquet"), RULES)
    assert zipped == [True, False]
    if case == "key_repeated":
        assert len(after) == len(before) + 7 * 4  # 2 x 2 x 2 rows for the key twice in each of 4 shards
        return
    assert after == before
