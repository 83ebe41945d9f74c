"""One score file: a shard's scores under one scorer, written atomically with its provenance.

For each scorer, every input shard becomes one Parquet file
``<work>/scores/<scorer>/dataset=<dataset>/<shard>.parquet`` holding one row per sample of the
shard (``dataset, shard, key, kind, error`` plus the scorer's columns). Its metadata carries the
scorer identity, its config hash, the input shard's version (size and mtime, or ETag) and the
checksum the worker computed as it read it, so a rerun can tell a file that is done (same hash,
same version) from one to score again (:func:`is_done`) without reading the shard.

:func:`score_shard` scores a shard with one scorer; ``curation.scoring.fused`` scores it with
several in one read and one decode (what the workers run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from curation.data import storage
from scorers.base import Scorer

META_PREFIX = b"curation."


@dataclass(frozen=True)
class ShardTask:
    """One input shard to score: where it is, which dataset it belongs to, its kind."""

    url: str
    dataset: str
    kind: str = "auto"
    checksum: str | None = None  # not filled by the planner any more: the worker hashes what it reads
    version: str | None = None  # size:mtime locally, the ETag on S3: from the planner's listing (no bytes read)


@dataclass
class ShardResult:
    url: str
    dataset: str
    out: str
    rows: int = 0
    errors: int = 0
    seconds: float = 0.0
    skipped: bool = False
    failed: str | None = None
    attempts: int = 1
    peak_rss_mb: float | None = None  # of the process that scored the shard, at the end of it
    node: str = ""  # the Ray node that scored it (empty when scored in-process)
    started_at: float | None = None  # wall clock when the worker began the shard (throughput windows)
    pid: int | None = None  # the process that scored it
    scorer: str = ""  # whose score file this is




def score_file_url(work: str, scorer: str, dataset: str, shard: str) -> str:
    return storage.join(work, "scores", scorer, f"dataset={dataset}", f"{shard}.parquet")


def read_score_metadata(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str] | None:
    """The ``curation.*`` metadata of a score file, or None if it does not exist / is unreadable."""
    fs, path = storage.get_fs(url, storage_options)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            md = pq.read_metadata(f).metadata or {}
    except Exception:  # noqa: BLE001 - an unreadable file is simply not done
        return None
    return {k[len(META_PREFIX):].decode(): v.decode() for k, v in md.items() if k.startswith(META_PREFIX)}


def is_done(md: dict[str, str] | None, config_hash: str, shard_version: str | None) -> bool:
    """Whether a score file's metadata says it holds this scorer config's scores of this shard
    version (size and mtime, or ETag: a shard changed in place under the same size and mtime is
    caught later, when resharding verifies the recorded checksum as it copies)."""
    if md is None or md.get("config_hash") != config_hash:
        return False
    return shard_version is not None and md.get("shard_version") == shard_version


# --------------------------------------------------------------------------- one shard


def score_shard(scorer: Scorer, task: ShardTask, out_url: str, batch_size: int = 64, prefetch: int = 2,
                storage_options: dict[str, Any] | None = None, decode_workers: int = 1) -> ShardResult:
    """Score one shard with one set-up scorer and write its Parquet file atomically (a fused
    pass of one: ``curation.scoring.fused``). Raises when the scorer or the shard fails."""
    from curation.scoring.fused import PassOptions, score_shard_pass

    (result,) = score_shard_pass([(scorer, out_url)], task, PassOptions(batch_size, decode_workers, prefetch),
                                 storage_options)
    if result.failed:
        raise RuntimeError(result.failed)
    return result
