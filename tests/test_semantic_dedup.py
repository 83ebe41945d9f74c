"""``semantic_dedup``: near-duplicate embeddings (cosine >= threshold) found within k-means clusters
(faiss), linked transitively, one sample kept per group, first by preference, among the samples
still kept at the rule's place in the policy."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import ScoreStore, load_policy, run_selection
from curation.selection.semantic_dedup import brute_force_pairs, semantic_pairs


def clustered_embeddings(n: int, d: int = 64, topics: int = 40, dup_share: float = 0.3, seed: int = 0) -> np.ndarray:
    """Embeddings around ``topics`` centres, a ``dup_share`` of them near-copies of another."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, d))
    emb = centres[rng.integers(0, topics, n)] + rng.normal(size=(n, d)) * 0.9
    dups = rng.random(n) < dup_share
    src = rng.integers(0, n, n)
    emb[dups] = emb[src[dups]] + rng.normal(size=(int(dups.sum()), d)) * 0.05 * rng.random((int(dups.sum()), 1))
    return emb.astype(np.float32)


def test_clustered_search_recalls_brute_force_pairs():
    emb = clustered_embeddings(4000)
    truth = {tuple(p) for p in brute_force_pairs(emb, 0.95)}
    found = {tuple(p) for p in semantic_pairs(emb, 0.95, clusters=40)}
    assert len(truth) > 500
    assert found <= truth  # every pair found is a real one
    assert len(found & truth) / len(truth) >= 0.99


def _write_scores(work: str, rows: list[dict]) -> None:
    """A clip-like score file per shard in the store's layout (dataset, shard, key, kind, error + columns)."""
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    for shard, rs in by_shard.items():
        path = os.path.join(work, "scores", "clip", "dataset=web", f"{shard}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        table = pa.table({"dataset": ["web"] * len(rs), "shard": [r["shard"] for r in rs], "key": [r["key"] for r in rs],
                          "kind": ["pair"] * len(rs), "error": pa.nulls(len(rs), pa.string()),
                          "quality": pa.array([r["quality"] for r in rs], pa.float32()),
                          "clip_image_emb": pa.array([r["emb"] for r in rs], pa.list_(pa.float32()))})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue())


def _reference_kept(rows: list[dict], alive: set[str], threshold: float, prefer: bool) -> set[str]:
    """Brute force: union-find over all pairs among ``alive`` rows, first of each group kept."""
    live = [r for r in rows if r["key"] in alive]
    order = sorted(live, key=lambda r: ((-r["quality"]) if prefer else 0, r["shard"], r["key"]))
    emb = np.array([r["emb"] for r in order], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    parent = list(range(len(order)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i
    for i, j in zip(*np.nonzero(np.triu(emb @ emb.T >= threshold, 1))):
        a, b = find(i), find(j)
        parent[max(a, b)] = min(a, b)
    return {order[i]["key"] for i in range(len(order)) if find(i) == i}


@pytest.mark.parametrize("prefer", [False, True])
def test_rule_keeps_one_per_group_among_samples_still_kept(tmp_path, prefer):
    rng = np.random.default_rng(3)
    emb = clustered_embeddings(600, d=32, topics=12, dup_share=0.4, seed=5)
    base = rng.normal(size=32)  # a chain a ~ b ~ c whose ends are not within the threshold
    step = rng.normal(size=32)
    step -= step @ base / (base @ base) * base
    step *= np.linalg.norm(base) * 0.3 / np.linalg.norm(step)
    chain = [base, base + step, base + 2 * step]
    rows = [{"shard": f"{i % 3:05d}", "key": f"k{i:04d}", "quality": float(rng.random()), "emb": e.tolist()}
            for i, e in enumerate(list(emb) + chain)]
    work = str(tmp_path / "work")
    _write_scores(work, rows)
    rule = {"rule": "semantic_dedup", "threshold": 0.95, "clusters": 12}
    if prefer:
        rule["prefer"] = "quality"
    policy = load_policy({"defaults": [{"rule": "threshold", "column": "quality", "min": 0.1}, rule]})
    result = run_selection(ScoreStore(work), policy)
    decisions = {d["key"]: d["dropped_by"] for d in pq.read_table(result.decisions_url).to_pylist()}
    alive = {r["key"] for r in rows if r["quality"] >= 0.1}
    kept = {k for k, why in decisions.items() if why is None}
    assert kept == _reference_kept(rows, alive, 0.95, prefer)
    assert {why for k, why in decisions.items() if k in alive - kept} == {"semantic_dedup:clip_image_emb"}
    a, b, c = (f"k{i:04d}" for i in range(600, 603))
    if {a, b, c} <= alive:
        assert len({a, b, c} & kept) == 1  # the chain is one group


def test_unknown_embedding_column_is_refused(tmp_path):
    work = str(tmp_path / "work")
    _write_scores(work, [{"shard": "00000", "key": f"k{i}", "quality": 1.0, "emb": [1.0, 0.0]} for i in range(3)])
    from curation.selection.policy import PolicyError

    with pytest.raises(PolicyError, match="unknown column 'img_emb'"):
        run_selection(ScoreStore(work), load_policy({"defaults": [{"rule": "semantic_dedup", "column": "img_emb"}]}))
