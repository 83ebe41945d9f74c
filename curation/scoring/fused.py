"""A fused scoring pass: one read, one hash and one decode of each sample, for several scorers.

Every scorer still writes its own score file (``curation.scoring.scorefile``), so the store's
layout, resume and config-hash invalidation are those of scoring with one scorer at a time.

The shard goes through three stages:

1. a reader thread streams the tar (``open_shard``), hashing every byte as it goes
   (``ShardDigest``: the checksum the score files record, so the planner never reads a shard),
   and groups raw samples into batches;
2. ``decode_workers`` threads each take a batch, build its typed samples (verification decodes
   each image once and keeps the pixels on the sample), then run every scorer's ``prepare`` on
   those pixels (resize, tokenize, hashes) and drop the pixels. Threads, not processes: Pillow,
   torchvision and hashlib release the GIL while they work, and the prepared tensors reach the
   model without being copied between processes;
3. the calling thread runs each scorer's ``compute`` (the model) on the batches in order.

Up to ``prefetch`` batches wait ahead of the model. A scorer that fails on a shard is reported
failed for that shard while the others go on; a shard that cannot be read fails for all.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.common.prefetch import prefetch
from curation.data import storage
from curation.data.builders import ReadOptions, to_sample
from curation.data.keyscan import read_light
from curation.data.records import ShardDigest, ShardError, iter_raw_samples, open_shard, shard_name
from curation.scoring.scorefile import META_PREFIX, ShardResult, ShardTask
from scorers.base import IDENTITY_SCHEMA, Scorer


@dataclass(frozen=True)
class PassOptions:
    """How a worker feeds its scorers: samples per batch, decode threads, batches read ahead."""

    batch_size: int = 64
    decode_workers: int = 1
    prefetch: int = 2


def _raw_batches(task: ShardTask, batch_size: int, digest: ShardDigest,
                 storage_options: dict[str, Any] | None) -> Iterator[list[Any]]:
    with open_shard(task.url, storage_options, digest) as f:
        batch: list[Any] = []
        try:
            for raw in iter_raw_samples(f):
                batch.append(raw)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        except ShardError as e:
            raise ShardError(f"shard {task.url}: {e}") from None
        if batch:
            yield batch
        digest.finish()  # the rest of the file, then the checksum the score files record


def _light_batches(task: ShardTask, batch_size: int, digest: ShardDigest,
                   storage_options: dict[str, Any] | None) -> Iterator[list[Any]]:
    """Typed samples without media, for a pass whose scorers decode nothing (``needs_media =
    False``: shipped metadata, captions): media bodies are seeked past, so nothing hashes the
    shard's bytes and its score files record the version (size:mtime or ETag) without a checksum."""
    fs, path = storage.get_fs(task.url, storage_options)
    digest.size, digest.version = storage.file_version(fs, path)
    if storage.is_remote(task.url) and not digest.version.count(":"):
        digest.checksum = digest.version  # the ETag names the object's bytes
    batch: list[Any] = []
    for s in read_light(task.url, kind=task.kind, dataset=task.dataset, storage_options=storage_options):
        batch.append(s)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def needs_media(scorers: list[Any]) -> bool:
    """Whether any scorer of a pass reads media (only then is the shard read whole and decoded).
    Scorers or scorer classes: ``needs_media`` is a class attribute (``False``: shipped metadata,
    captions), so the planner groups passes by it before any scorer is built."""
    return any(getattr(s, "needs_media", True) for s in scorers)


def _drop_pixels(samples: list[Any]) -> None:
    for s in samples:
        if isinstance(getattr(s, "pixels", None), dict):
            s.pixels = {}
        elif hasattr(s, "pixels"):
            s.pixels = None


class _Preparer:
    """Builds a batch's samples (one decode each) and every live scorer's ``prepare`` of them."""

    def __init__(self, task: ShardTask, scorers: list[Scorer]) -> None:
        self.task, self.scorers = task, scorers
        self.light = not needs_media(scorers)  # samples arrive typed, without media (read_light)
        on_device = all(getattr(s, "decode", "cpu") == "gpu" for s in scorers)
        # verification decodes on the CPU unless every scorer decodes on its device (then only headers)
        self.opts = ReadOptions(kind=task.kind, verify=not on_device, keep_pixels=True)
        self.locks = {id(s): threading.Lock() for s in scorers if not s.prepare_threadsafe}
        self.failed: dict[int, str] = {}  # id(scorer) -> why it stopped on this shard

    def __call__(self, raws: list[Any]) -> tuple[list[Any], dict[int, Any]]:
        name = shard_name(self.task.url)
        samples = raws if self.light else [to_sample(r, self.task.dataset, name, self.task.url, self.opts)
                                           for r in raws]
        out: dict[int, Any] = {}
        for sc in self.scorers:
            if id(sc) in self.failed:
                continue
            try:
                lock = self.locks.get(id(sc))
                if lock is None:
                    out[id(sc)] = sc.prepare(samples)
                else:
                    with lock:
                        out[id(sc)] = sc.prepare(samples)
            except Exception as e:  # noqa: BLE001 - this scorer fails on this shard; the others go on
                out[id(sc)] = e
        _drop_pixels(samples)
        return samples, out


def _prepared_batches(task: ShardTask, prep: _Preparer, opts: PassOptions, digest: ShardDigest,
                      storage_options: dict[str, Any] | None) -> Iterator[tuple[list[Any], dict[int, Any]]]:
    """Prepared batches in shard order, built on ``decode_workers`` threads."""
    read = _light_batches if prep.light else _raw_batches
    raws = prefetch(read(task, opts.batch_size, digest, storage_options), max(1, opts.prefetch),
                    name=f"read-{task.url}", join_timeout=5)
    pending: deque = deque()
    with ThreadPoolExecutor(max(1, opts.decode_workers), thread_name_prefix="decode") as pool:
        try:
            for raw in raws:
                pending.append(pool.submit(prep, raw))
                while len(pending) > max(1, opts.decode_workers) + max(0, opts.prefetch - 1):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            raws.close()


def _columns(sc: Scorer, prepared: Any, schema: pa.Schema) -> pa.Table:
    cols = sc.compute(prepared)
    n = len(prepared.samples)
    ident = {
        "dataset": [s.dataset for s in prepared.samples],
        "shard": [s.shard for s in prepared.samples],
        "key": [s.key for s in prepared.samples],
        "kind": [s.kind for s in prepared.samples],
        "error": list(prepared.errors),
    }
    return pa.Table.from_pydict({**ident, **{f.name: cols.get(f.name, [None] * n) for f in sc.schema()}}, schema=schema)


def score_shard_pass(jobs: list[tuple[Scorer, str]], task: ShardTask, opts: PassOptions = PassOptions(),
                     storage_options: dict[str, Any] | None = None) -> list[ShardResult]:
    """Score one shard with every ``(set-up scorer, score file url)`` of ``jobs`` in one read and
    one decode; one result per job (a job whose scorer raised is failed, the rest are written).
    A shard that cannot be read raises."""
    t0 = time.time()
    digest = ShardDigest()
    scorers = [sc for sc, _ in jobs]
    schemas = {id(sc): pa.schema(list(IDENTITY_SCHEMA) + list(sc.schema())) for sc in scorers}
    tables: dict[int, list[pa.Table]] = {id(sc): [] for sc in scorers}
    prep = _Preparer(task, scorers)
    for _samples, prepared in _prepared_batches(task, prep, opts, digest, storage_options):
        for sc in scorers:
            p = prepared.get(id(sc))
            if id(sc) in prep.failed or p is None:
                continue
            try:
                if isinstance(p, Exception):
                    raise p
                tables[id(sc)].append(_columns(sc, p, schemas[id(sc)]))
            except Exception as e:  # noqa: BLE001
                prep.failed[id(sc)] = f"{type(e).__name__}: {e}"
                tables[id(sc)] = []
    results = []
    for sc, out in jobs:
        if id(sc) in prep.failed:
            results.append(ShardResult(task.url, task.dataset, out, failed=prep.failed[id(sc)], scorer=sc.name))
            continue
        results.append(_write(sc, task, out, tables[id(sc)], schemas[id(sc)], digest, t0, storage_options))
    return results


def _write(sc: Scorer, task: ShardTask, out: str, tables: list[pa.Table], schema: pa.Schema, digest: ShardDigest,
           t0: float, storage_options: dict[str, Any] | None) -> ShardResult:
    import resource

    table = pa.concat_tables(tables) if tables else schema.empty_table()
    errors = sum(1 for e in table.column("error").to_pylist() if e is not None)
    meta = {
        "scorer": sc.name,
        "version": sc.version,
        "identity": json.dumps(sc.identity(), sort_keys=True, default=str),
        "config_hash": sc.config_hash(),
        "shard_url": task.url,
        "shard_checksum": digest.checksum,  # hashed by this worker as it read the shard
        "shard_version": digest.version,  # size:mtime or ETag at open: what the planner compares
        "shard_bytes": str(digest.size),
        "dataset": task.dataset,
        "rows": str(table.num_rows),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    table = table.replace_schema_metadata({META_PREFIX + k.encode(): v.encode() for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(out, buf.getvalue(), storage_options)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return ShardResult(task.url, task.dataset, out, rows=table.num_rows, errors=errors, seconds=time.time() - t0,
                       peak_rss_mb=round(peak, 1), started_at=t0, pid=os.getpid(), scorer=sc.name)
