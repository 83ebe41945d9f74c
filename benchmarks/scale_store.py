"""A synthetic score store shaped like a real COYO pool, written fast (no images, no models).

Three scorers (``basic``, ``clip``, ``deltaloss``) with the columns, types and file metadata the
real scorers write, ``per_shard`` rows a shard, one Parquet file per (scorer, shard) under
``<work>/scores/<scorer>/dataset=<name>/<shard>.parquet``. Duplicates are planted at known rates:

- exact duplicates (``dup_rate``): the row copies the ``sha256`` (and ``phash``) of an earlier row;
- near duplicates (``near_rate``): the row's ``phash`` is an earlier row's with 1..``near_bits``
  bits flipped (its ``sha256`` is its own).

Every value is a function of the row's global index (``splitmix64``), so a source row's hash is
computed, not looked up: a store of any size is written shard by shard in constant memory.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each value (Steele et al.'s SplitMix64 finalizer)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hex(values: np.ndarray, width: int) -> pa.Array:
    fmt = f"{{:0{width}x}}"
    return pa.array([fmt.format(int(v)) for v in values], pa.string())


def _meta(scorer: str, dataset: str, shard_url: str, rows: int, salt: int) -> dict[bytes, bytes]:
    md = {"scorer": scorer, "version": "1", "identity": json.dumps({"synthetic": scorer}),
          "config_hash": f"synthetic-{scorer}", "shard_url": shard_url,
          "shard_checksum": f"sha256:{salt:064x}", "dataset": dataset, "rows": str(rows),
          "created": "2026-01-01T00:00:00Z"}
    return {b"curation." + k.encode(): v.encode() for k, v in md.items()}


def shard_columns(dataset: str, shard_index: int, per_shard: int, dup_rate: float, near_rate: float,
                  near_bits: int = 4, offset: int = 0) -> dict[str, pa.Array]:
    """Every scorer's columns for one shard (identity columns included), keyed by column name."""
    n = per_shard
    g = np.arange(offset + shard_index * n, offset + (shard_index + 1) * n, dtype=np.uint64)
    rng = np.random.default_rng(int(splitmix64(np.array([g[0] ^ np.uint64(0xABCDEF)]))[0] >> np.uint64(1)))
    ident_src = g.copy()
    u = rng.random(n)
    earlier = g > 0
    dup = (u < dup_rate) & earlier
    near = (u >= dup_rate) & (u < dup_rate + near_rate) & earlier
    src = (rng.random(n) * g.astype(np.float64)).astype(np.uint64)  # a uniformly chosen earlier row
    ident_src[dup] = src[dup]
    phash = splitmix64(ident_src)
    flips = np.zeros(n, np.uint64)
    for _ in range(near_bits):  # 1..near_bits distinct-or-not flips: distance 1..near_bits (repeats cancel: >= 0)
        bit = rng.integers(0, 64, n).astype(np.uint64)
        use = rng.random(n) < 0.75
        flips ^= np.where(use, np.uint64(1) << bit, np.uint64(0))
    flips[near & (flips == 0)] = np.uint64(1)
    phash[near] = splitmix64(src[near]) ^ flips[near]
    shard = f"{shard_index:06d}"
    keys = pa.array([f"{shard}_{j:05d}" for j in range(n)], pa.string())
    width = rng.integers(16, 1024, n).astype(np.int32)
    height = rng.integers(16, 1024, n).astype(np.int32)
    words = rng.integers(0, 30, n).astype(np.int32)
    clip = rng.normal(0.28, 0.05, n).astype(np.float32)
    loss_s = rng.gamma(4.0, 1.0, n).astype(np.float32)
    loss_l = (loss_s * rng.uniform(0.5, 1.1, n)).astype(np.float32)
    return {
        "dataset": pa.array([dataset] * n, pa.string()), "shard": pa.array([shard] * n, pa.string()), "key": keys,
        "kind": pa.array(["pair"] * n, pa.string()), "error": pa.nulls(n, pa.string()),
        "decodable": pa.array(np.ones(n, bool)), "width": pa.array(width), "height": pa.array(height),
        "aspect_ratio": pa.array((np.maximum(width, height) / np.minimum(width, height)).astype(np.float32)),
        "caption_chars": pa.array(words * 6), "caption_words": pa.array(words),
        "num_images": pa.array(np.ones(n, np.int32)), "num_frames": pa.nulls(n, pa.int32()),
        "sha256": _hex(splitmix64(ident_src ^ np.uint64(0x5A5A5A5A)), 64), "phash": _hex(phash, 16),
        "motion": pa.nulls(n, pa.float32()),
        "clip_score": pa.array(clip), "clip_min": pa.array(clip), "clip_num_images": pa.array(np.ones(n, np.int32)),
        "clip_images_below": pa.array(np.zeros(n, np.int32)),
        "clip_best_sentence": pa.nulls(n, pa.list_(pa.int32())), "clip_best_score": pa.nulls(n, pa.list_(pa.float32())),
        "clip_sim_matrix": pa.nulls(n, pa.list_(pa.list_(pa.float32()))),
        "clip_assigned_score": pa.nulls(n, pa.list_(pa.float32())), "clip_assigned_min": pa.nulls(n, pa.float32()),
        "clip_frame_scores": pa.nulls(n, pa.list_(pa.float32())),
        "loss_small": pa.array(loss_s), "loss_large": pa.array(loss_l), "delta_loss": pa.array(loss_s - loss_l),
        "answer_tokens": pa.array(words + 2), "answer_tokens_large": pa.array(words + 2),
    }


SCORER_COLUMNS = {
    "basic": ["decodable", "width", "height", "aspect_ratio", "caption_chars", "caption_words", "num_images",
              "num_frames", "sha256", "phash", "motion"],
    "clip": ["clip_score", "clip_min", "clip_num_images", "clip_images_below", "clip_best_sentence", "clip_best_score",
             "clip_sim_matrix", "clip_assigned_score", "clip_assigned_min", "clip_frame_scores"],
    "deltaloss": ["loss_small", "loss_large", "delta_loss", "answer_tokens", "answer_tokens_large"],
}


def write_store(work: str, rows: int, per_shard: int = 10_000, dataset: str = "coyo", dup_rate: float = 0.02,
                near_rate: float = 0.02, near_bits: int = 4, offset: int = 0,
                skip: dict[str, set[int]] | None = None) -> int:
    """Write ``rows`` rows (whole shards) of the three scorers under ``work``; returns the shard count.

    ``skip`` leaves out some scorers' files (``{"clip": {3}}``: clip has no score file for shard 3),
    as a failed scoring run would. ``offset`` starts the global row index elsewhere (a second dataset).
    """
    shards = max(1, rows // per_shard)
    ident = ["dataset", "shard", "key", "kind", "error"]
    for i in range(shards):
        cols = shard_columns(dataset, i, per_shard, dup_rate, near_rate, near_bits, offset)
        url = f"/synthetic/{dataset}/{i:06d}.tar"
        for scorer, names in SCORER_COLUMNS.items():
            if skip and i in skip.get(scorer, set()):
                continue
            table = pa.table({c: cols[c] for c in ident + names})
            table = table.replace_schema_metadata(_meta(scorer, dataset, url, per_shard, offset + i))
            d = os.path.join(work, "scores", scorer, f"dataset={dataset}")
            os.makedirs(d, exist_ok=True)
            pq.write_table(table, os.path.join(d, f"{i:06d}.parquet"), compression="zstd")
    return shards



DROP_REASONS = ["top_k:delta_loss", "valid:max_aspect_ratio", "valid:min_caption_words", "threshold:clip_score>=0.2",
                "valid:min_size", "dedup:sha256", "near_dedup:phash"]  # bench_scale's policy's rules
SPREAD = 2654435761  # a prime past any row count here: i -> i * SPREAD mod rows is a permutation


def write_decisions(path: str, kept: int, kept_fraction: float = 0.331, per_shard: int = 10_000,
                    dataset: str = "coyo") -> int:
    """A decision table alone (no shards, no scores) with exactly ``kept`` kept samples, as
    ``curate select`` writes one: columns dataset, shard, key, kind, dropped_by, sorted by dataset,
    shard, key, zstd, 122880-row row groups. About ``kept_fraction`` of the rows are kept (1M rows of
    bench_scale's store keep 0.331), spread over the shards; the others are dropped by one of
    bench_scale's rules. For a dry run of the reshard planner at kept counts past what a selection
    on this machine reaches. Returns the rows written."""
    import duckdb

    rows = int(round(kept / kept_fraction))
    reasons = "[" + ", ".join(f"'{r}'" for r in DROP_REASONS) + "]"
    shard = f"lpad((i // {per_shard})::VARCHAR, 6, '0')"
    con = duckdb.connect(config={"memory_limit": "1GB", "preserve_insertion_order": True})
    con.execute("SET enable_progress_bar = false")
    con.execute(f"""COPY (
        SELECT '{dataset}' AS dataset, {shard} AS shard,
               {shard} || '_' || lpad((i % {per_shard})::VARCHAR, 5, '0') AS key, 'pair' AS kind,
               CASE WHEN (i * {SPREAD}) % {rows} < {kept} THEN NULL
                    ELSE {reasons}[1 + (hash(i) % {len(DROP_REASONS)})::INT] END AS dropped_by
        FROM range({rows}) t(i) ORDER BY i
    ) TO '{path}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)""")
    con.close()
    return rows
