"""The scoring engine: scorers over shards, on Ray, resumable, exactly once.

For each scorer, every input shard becomes one Parquet file
``<work>/scores/<scorer>/dataset=<dataset>/<shard>.parquet`` holding one row per sample
of the shard (``dataset, shard, key, kind, error`` plus the scorer's columns). Files are
written atomically and carry the scorer identity, its config hash and the input shard's
checksum in their metadata; a rerun skips every file whose hash and checksum match, so a
killed run resumes where it stopped and a changed scorer or shard is scored again.

Workers are Ray actors (``ray.init()`` locally, or the cluster in ``RAY_ADDRESS``): a model
loads once per actor. Inside an actor a reader thread streams the shard, decodes and
prepares batches (``Scorer.prepare``) while the main thread runs the model
(``Scorer.compute``), so decoding overlaps compute. A shard whose scoring fails is retried,
then reported with its error while every other shard completes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.data import storage
from curation.common.prefetch import prefetch
from curation.data.shards import file_checksum, read_shard
from scorers import build_scorer, scorer_class
from scorers.base import IDENTITY_SCHEMA, Scorer

log = logging.getLogger(__name__)

META_PREFIX = b"curation."


@dataclass(frozen=True)
class ShardTask:
    """One input shard to score: where it is, which dataset it belongs to, its kind."""

    url: str
    dataset: str
    kind: str = "auto"
    checksum: str | None = None  # filled by the driver (md5 locally, ETag on S3)


@dataclass
class ScorerSpec:
    """A scorer by registry name, its parameters and the resources of its workers."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 2

    def build(self) -> Scorer:
        return build_scorer(self.name, **self.params)


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


@dataclass
class RunReport:
    scorer: str
    config_hash: str
    work: str
    shards: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def scored(self) -> list[ShardResult]:
        return [s for s in self.shards if not s.skipped and not s.failed]

    @property
    def failed(self) -> list[ShardResult]:
        return [s for s in self.shards if s.failed]

    @property
    def skipped(self) -> list[ShardResult]:
        return [s for s in self.shards if s.skipped]

    def summary(self) -> dict[str, Any]:
        rows = sum(s.rows for s in self.scored)
        return {
            "scorer": self.scorer,
            "config_hash": self.config_hash,
            "shards": len(self.shards),
            "scored": len(self.scored),
            "skipped": len(self.skipped),
            "failed": [{"url": s.url, "error": s.failed} for s in self.failed],
            "rows": rows,
            "sample_errors": sum(s.errors for s in self.scored),
            "seconds": round(self.seconds, 2),
            "samples_per_s": round(rows / self.seconds, 1) if self.seconds > 0 else None,
            "shards_per_node": dict(Counter(s.node for s in self.scored if s.node)),
        }


# --------------------------------------------------------------------------- paths & metadata


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


def _batches(task: ShardTask, batch_size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for s in read_shard(task.url, kind=task.kind, dataset=task.dataset):
        batch.append(s)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(task: ShardTask, scorer: Scorer, batch_size: int, depth: int) -> Iterator[Any]:
    """Read + prepare batches on a thread, ``depth`` batches ahead of the consumer."""
    return prefetch((scorer.prepare(b) for b in _batches(task, batch_size)), depth, name=f"prefetch-{task.url}",
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


# --------------------------------------------------------------------------- Ray


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """``ray.init`` once: the cluster in ``address``/``RAY_ADDRESS`` if set, else a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from e
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail at once on a Ray address nothing listens on (ray.init would retry for minutes)."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # let Ray interpret unusual forms itself
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from None


def _make_worker_class():
    import ray

    @ray.remote
    class ScoringWorker:
        """Holds one set-up scorer (its model loaded once) and scores shards with it."""

        def __init__(self, name: str, params: dict[str, Any], threads: int, gpus: float = 0.0) -> None:
            import inspect

            import torch

            torch.set_num_threads(max(1, threads))
            params = dict(params)
            cls = scorer_class(name)
            if gpus > 0 and "device" not in params and "device" in inspect.signature(cls.__init__).parameters:
                params["device"] = "cuda"  # a worker given a GPU uses it unless told otherwise
            self.scorer = cls(**params)
            self.scorer.setup()

        def score(self, task: ShardTask, out_url: str, batch_size: int) -> ShardResult:
            result = score_shard(self.scorer, task, out_url, batch_size)
            result.node = ray.get_runtime_context().get_node_id()
            return result

    return ScoringWorker


class SourceConflictError(ValueError):
    """Two input shards that would share one score file (same dataset, same shard name)."""


def plan_tasks(tasks: list[ShardTask], scorer: Scorer, work: str,
               storage_options: dict[str, Any] | None = None) -> tuple[list[ShardTask], list[ShardResult]]:
    """Fill in shard checksums; split into (to score, already done). Two sources with one
    identity (dataset, shard name), in this run or in a score file an earlier run wrote, are
    refused before anything is scored, naming both: one would overwrite the other."""
    from curation.data.shards import shard_name

    todo, done, conflicts = [], [], []
    claimed: dict[str, str] = {}  # score file -> the shard url of this run that claims it
    h = scorer.config_hash()
    for t in tasks:
        out = score_file_url(work, scorer.name, t.dataset, shard_name(t.url))
        md = read_score_metadata(out, storage_options)
        other = claimed.setdefault(out, t.url)
        other = md["shard_url"] if other == t.url and md and md.get("shard_url") else other
        if other != t.url:
            conflicts.append(f"{t.dataset}/{shard_name(t.url)} is both {other} and {t.url}")
            continue
        if t.checksum is None:
            t = ShardTask(t.url, t.dataset, t.kind, file_checksum(t.url, storage_options)[1])
        if is_done(md, h, t.checksum):
            done.append(ShardResult(t.url, t.dataset, out, rows=int(md.get("rows", 0)), skipped=True))
        else:
            todo.append(t)
    if conflicts:
        raise SourceConflictError(f"{scorer.name}: two sources share a dataset and shard name: {'; '.join(conflicts[:5])}"
                                  f". Give one another dataset name, or remove its old score files under {work}")
    return todo, done


ProgressFn = Callable[[ShardResult, int, int], None]  # (result, shards done, shards total)


def run_scoring(
    tasks: list[ShardTask],
    spec: ScorerSpec,
    work: str,
    *,
    progress: ProgressFn | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> RunReport:
    """Score ``tasks`` with one scorer on Ray; return what was scored, skipped and failed."""
    import ray

    from curation.data.shards import shard_name

    t0 = time.time()
    scorer = spec.build()  # identity only: the model loads in the workers
    report = RunReport(spec.name, scorer.config_hash(), work)
    todo, done = plan_tasks(tasks, scorer, work)
    report.shards.extend(done)
    total = len(tasks)
    for r in done:
        if progress:
            progress(r, len(report.shards), total)
    if not todo:
        report.seconds = time.time() - t0
        return report
    ensure_ray(num_cpus, ray_address)
    Worker = _make_worker_class()
    n_workers = max(1, min(spec.workers, len(todo)))
    threads = max(1, int(spec.num_cpus))
    opts = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}

    def new_worker():
        return Worker.options(**opts).remote(spec.name, spec.params, threads, spec.num_gpus)

    workers = [new_worker() for _ in range(n_workers)]
    pending: list[tuple[ShardTask, int]] = [(t, 1) for t in todo]
    running: dict[Any, tuple[ShardTask, int, int]] = {}  # ref -> (task, attempt, worker index)
    free = list(range(n_workers))
    while pending or running:
        while pending and free:
            task, attempt = pending.pop(0)
            w = free.pop(0)
            out = score_file_url(work, spec.name, task.dataset, shard_name(task.url))
            running[workers[w].score.remote(task, out, spec.batch_size)] = (task, attempt, w)
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        task, attempt, w = running.pop(ref)
        try:
            result: ShardResult = ray.get(ref)
            result.attempts = attempt
        except Exception as e:  # noqa: BLE001 - the shard failed; others go on
            if isinstance(e, ray.exceptions.RayActorError):
                workers[w] = new_worker()  # the actor died (OOM, segfault): replace it
            reason = _short_error(e)
            if attempt <= spec.max_retries and not _is_permanent(e):
                log.warning("scoring %s with %s failed (attempt %d), retrying: %s", task.url, spec.name, attempt, reason)
                pending.append((task, attempt + 1))
                free.append(w)
                continue
            out = score_file_url(work, spec.name, task.dataset, shard_name(task.url))
            result = ShardResult(task.url, task.dataset, out, failed=reason, attempts=attempt)
        free.append(w)
        report.shards.append(result)
        if progress:
            progress(result, len(report.shards), total)
    for w in workers:
        ray.kill(w)
    report.seconds = time.time() - t0
    return report


def _is_permanent(e: BaseException) -> bool:
    """A shard that is empty or not a tar fails the same way every time: no retry."""
    from curation.data.shards import ShardError

    return isinstance(getattr(e, "cause", None) or e, ShardError)


def _short_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def score_local(tasks: list[ShardTask], spec: ScorerSpec, work: str, progress: ProgressFn | None = None) -> RunReport:
    """The same as :func:`run_scoring` in this process, without Ray (notebooks, debugging)."""
    from curation.data.shards import shard_name

    t0 = time.time()
    scorer = spec.build()
    report = RunReport(spec.name, scorer.config_hash(), work)
    todo, done = plan_tasks(tasks, scorer, work)
    report.shards.extend(done)
    if todo:
        scorer.setup()
    for task in todo:
        out = score_file_url(work, spec.name, task.dataset, shard_name(task.url))
        try:
            result = score_shard(scorer, task, out, spec.batch_size)
        except Exception as e:  # noqa: BLE001
            result = ShardResult(task.url, task.dataset, out, failed=f"{type(e).__name__}: {e}")
        report.shards.append(result)
        if progress:
            progress(result, len(report.shards), len(tasks))
    report.seconds = time.time() - t0
    return report


def to_json(report: RunReport) -> str:
    return json.dumps({**report.summary(), "shard_results": [asdict(s) for s in report.shards]}, indent=2)
