"""Semantic deduplication (SemDeDup) over stored CLIP image embeddings, as a selection rule.

``{rule: semantic_dedup, column: clip_image_emb, threshold: 0.95, clusters: K}``: two samples
whose L2-normalized embeddings have cosine >= ``threshold`` are duplicates, linked transitively,
and each connected group keeps one sample, the first by ``prefer`` then ``(shard, key)``, as
``near_dedup`` does. Comparing all pairs costs n^2; as in SemDeDup (and NeMo Curator), the
embeddings are first clustered with k-means (faiss) and pairs are sought only within clusters.
Each embedding joins its ``probes`` nearest clusters (default 2), so a pair that k-means cut
across a boundary is still found; the cost is about ``probes^2 * n^2 / K`` dot products.

Before the policy's query runs, :func:`edge_tables` computes each rule's duplicate pairs per
dataset from the store (embeddings never enter the SQL sandbox); the rule's SQL step then groups
the pairs whose both ends are still kept at its place in the chain (:func:`semantic_dedup_step`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from curation.selection.sqlsafe import ident as q


def normalize(emb: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit length (float32); ``inplace`` reuses ``emb``'s memory when it can."""
    out = np.ascontiguousarray(emb, dtype=np.float32)
    if (not inplace and out is emb) or not out.flags.writeable:
        out = out.copy()
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def cluster_members(emb: np.ndarray, clusters: int, probes: int = 2, seed: int = 0, niter: int = 20
                    ) -> list[np.ndarray]:
    """Row indices of each k-means cluster (spherical k-means, faiss), each row in its ``probes``
    nearest clusters. ``emb`` rows must be L2-normalized."""
    import faiss

    n, d = emb.shape
    k = max(1, min(clusters, n // 4 or 1))
    if k == 1:
        return [np.arange(n)]
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False, max_points_per_centroid=256)
    km.train(emb)
    _, nearest = km.index.search(emb, min(probes, k))
    rows = np.repeat(np.arange(n), nearest.shape[1])
    labels = nearest.reshape(-1)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return [rows[order[bounds[c]:bounds[c + 1]]] for c in range(k) if bounds[c + 1] - bounds[c] > 1]


def pairs_within(emb: np.ndarray, members: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """(m, 2) row pairs i < j of ``members`` with cosine >= ``threshold``."""
    out = []
    sub = emb[members]
    for lo in range(0, len(members), block):
        sims = sub[lo:lo + block] @ sub.T
        a, b = np.nonzero(sims >= threshold)
        i, j = members[a + lo], members[b]
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def semantic_pairs(emb: np.ndarray, threshold: float, clusters: int, probes: int = 2, seed: int = 0,
                   inplace: bool = False) -> np.ndarray:
    """Unique (i, j), i < j, of rows with cosine >= ``threshold`` found within clusters."""
    emb = normalize(emb, inplace)
    found = [pairs_within(emb, m, threshold) for m in cluster_members(emb, clusters, probes, seed)]
    found = [p for p in found if len(p)]
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def brute_force_pairs(emb: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """Every (i, j), i < j, with cosine >= ``threshold``: the reference the clustered search is
    measured against."""
    emb = normalize(emb)
    return pairs_within(emb, np.arange(len(emb)), threshold, block)


# --------------------------------------------------------------------------- the rule's SQL side


def table_name(rule: Any) -> str:
    """The table holding one rule's duplicate pairs (named by the rule's parameters)."""
    blob = json.dumps(rule.model_dump(), sort_keys=True, default=str).encode()
    return f"_semantic_pairs_{hashlib.sha256(blob).hexdigest()[:12]}"


def semantic_dedup_step(prev: str, pairs_table: str, order: str, label_sql: str) -> str:
    """A CTE body over ``prev`` that marks ``dropped_by = label`` on every kept sample linked (by
    pairs whose both ends are still kept) to one ranked before it by ``order``."""
    alive = (f"SELECT dataset, shard, key, row_number() OVER (ORDER BY {order}) AS _rank FROM {prev} "
             f"WHERE dropped_by IS NULL")
    edges = (f"SELECT a._rank AS src, b._rank AS dst FROM {q(pairs_table)} e JOIN _alive a ON a.dataset = e.dataset "
             f"AND a.shard = e.shard_a AND a.key = e.key_a JOIN _alive b ON b.dataset = e.dataset "
             f"AND b.shard = e.shard_b AND b.key = e.key_b")
    groups = ("SELECT node, node FROM _nodes UNION SELECT e.dst, min(w.grp) FROM _groups w JOIN _edges e ON "
              "w.node = e.src JOIN recurring._groups r ON r.node = e.dst GROUP BY e.dst HAVING min(w.grp) < min(r.grp)")
    dropped = "SELECT a.dataset, a.shard, a.key FROM _alive a JOIN _groups g ON a._rank = g.node WHERE g.grp < a._rank"
    return (
        f"WITH RECURSIVE _alive AS ({alive}), _one AS ({edges}), _edges AS (SELECT src, dst FROM _one UNION "
        f"SELECT dst, src FROM _one), _nodes AS (SELECT src AS node FROM _edges UNION SELECT dst FROM _edges), "
        f"_groups(node, grp) USING KEY (node) AS ({groups}), _dups AS ({dropped}) "
        f"SELECT p.* REPLACE (CASE WHEN p.dropped_by IS NULL AND n.key IS NOT NULL THEN {label_sql} "
        f"ELSE p.dropped_by END AS dropped_by) FROM {prev} p LEFT JOIN _dups n ON p.dataset = n.dataset AND p.shard = n.shard AND p.key = n.key"
    )


def edge_tables(policy: Any, store: Any, datasets: list[str]) -> dict[str, Any]:
    """For every ``semantic_dedup`` rule of the policy: its duplicate pairs in the datasets it
    applies to, as an Arrow table (dataset, shard_a, key_a, shard_b, key_b) named :func:`table_name`."""
    import pyarrow as pa

    from curation.selection.policy import PolicyError

    tables: dict[str, Any] = {}
    columns = set(store.columns())
    for ds in datasets:
        for rule in policy.rules_for(ds):
            if getattr(rule, "rule", None) != "semantic_dedup":
                continue
            if rule.column not in columns:
                raise PolicyError(f"semantic_dedup: unknown column {rule.column!r} (score the clip scorer with "
                                  f"keep_embedding: true for clip_image_emb)")
            part = _dataset_pairs(store, ds, rule)
            name = table_name(rule)
            tables[name] = pa.concat_tables([tables[name], part]) if name in tables else part
    return tables


def _dataset_pairs(store: Any, dataset: str, rule: Any) -> Any:
    import pyarrow as pa

    from curation.selection.sqlsafe import literal

    t = store.query_arrow(f"SELECT shard, key, {q(rule.column)} AS emb FROM scores WHERE dataset = {literal(dataset)} "
                          f"AND {q(rule.column)} IS NOT NULL ORDER BY shard, key")
    empty = pa.table({c: pa.array([], pa.string()) for c in ("dataset", "shard_a", "key_a", "shard_b", "key_b")})
    if t.num_rows < 2:
        return empty
    flat = t.column("emb").combine_chunks()
    emb = flat.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(t.num_rows, -1)
    pairs = semantic_pairs(emb, rule.threshold, rule.clusters, rule.probes, rule.seed, inplace=True)
    shard, key = t.column("shard").combine_chunks(), t.column("key").combine_chunks()
    ia, ib = pa.array(pairs[:, 0]), pa.array(pairs[:, 1])
    return pa.table({"dataset": pa.array([dataset] * len(pairs), pa.string()), "shard_a": shard.take(ia),
                     "key_a": key.take(ia), "shard_b": shard.take(ib), "key_b": key.take(ib)})
