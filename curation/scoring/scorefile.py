"""One score file: a shard's scores under one scorer, written atomically with its provenance.

For each scorer, every input shard becomes one Parquet file
``<work>/scores/<scorer>/dataset=<dataset>/<shard>.parquet`` holding one row per sample of the
shard (``dataset, shard, key, kind, error`` plus the scorer's columns). Its metadata carries the
scorer identity, its config hash and the input shard's checksum, so a rerun can tell a file
that is done (same hash, same checksum) from one to score again (:func:`is_done`).

Inside :func:`score_shard` a reader thread streams the shard and prepares batches
(``Scorer.prepare``) while the calling thread runs the model (``Scorer.compute``).
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.common.prefetch import prefetch
from curation.data import storage
from curation.data.keyscan import read_light
from curation.data.shards import read_shard
from scorers.base import IDENTITY_SCHEMA, Scorer

META_PREFIX = b"curation."


@dataclass(frozen=True)
class ShardTask:
    """One input shard to score: where it is, which dataset it belongs to, its kind."""

    url: str
    dataset: str
    kind: str = "auto"
    checksum: str | None = None  # filled by the driver (md5 locally, ETag on S3)


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


def is_done(md: dict[str, str] | None, config_hash: str, shard_checksum: str | None) -> bool:
    """Whether a score file's metadata says it holds this scorer config's scores of these shard bytes."""
    if md is None or md.get("config_hash") != config_hash:
        return False
    return shard_checksum is None or md.get("shard_checksum") == shard_checksum


# --------------------------------------------------------------------------- one shard


def _batches(task: ShardTask, batch_size: int, media: bool = True) -> Iterator[list[Any]]:
    batch: list[Any] = []
    # a scorer that decodes no media (needs_media = False) gets keys, captions and small members only
    read = read_shard if media else read_light
    for s in read(task.url, kind=task.kind, dataset=task.dataset):
        batch.append(s)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(task: ShardTask, scorer: Scorer, batch_size: int, depth: int) -> Iterator[Any]:
    """Read + prepare batches on a thread, ``depth`` batches ahead of the consumer."""
    batches = _batches(task, batch_size, getattr(scorer, "needs_media", True))
    return prefetch((scorer.prepare(b) for b in batches), depth, name=f"prefetch-{task.url}",
                    join_timeout=5)


def score_shard(scorer: Scorer, task: ShardTask, out_url: str, batch_size: int = 64, prefetch: int = 2,
                storage_options: dict[str, Any] | None = None) -> ShardResult:
    """Score one shard with a set-up scorer and write its Parquet file atomically."""
    t0 = time.time()
    schema = pa.schema(list(IDENTITY_SCHEMA) + list(scorer.schema()))
    tables: list[pa.Table] = []
    errors = 0
    for prepared in _prefetch(task, scorer, batch_size, prefetch):
        cols = scorer.compute(prepared)
        n = len(prepared.samples)
        ident = {
            "dataset": [s.dataset for s in prepared.samples],
            "shard": [s.shard for s in prepared.samples],
            "key": [s.key for s in prepared.samples],
            "kind": [s.kind for s in prepared.samples],
            "error": list(prepared.errors),
        }
        errors += sum(e is not None for e in prepared.errors)
        data = {**ident, **{f.name: cols.get(f.name, [None] * n) for f in scorer.schema()}}
        tables.append(pa.Table.from_pydict(data, schema=schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    meta = {
        "scorer": scorer.name,
        "version": scorer.version,
        "identity": json.dumps(scorer.identity(), sort_keys=True, default=str),
        "config_hash": scorer.config_hash(),
        "shard_url": task.url,
        "shard_checksum": task.checksum or "",
        "dataset": task.dataset,
        "rows": str(table.num_rows),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    table = table.replace_schema_metadata({META_PREFIX + k.encode(): v.encode() for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(out_url, buf.getvalue(), storage_options)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return ShardResult(task.url, task.dataset, out_url, rows=table.num_rows, errors=errors, seconds=time.time() - t0,
                       peak_rss_mb=round(peak, 1), started_at=t0, pid=os.getpid())


