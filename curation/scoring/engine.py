"""The scoring engine: scorers over shards, on Ray, resumable, exactly once.

For each scorer, every input shard becomes one score file (``curation.scoring.scorefile``:
``<work>/scores/<scorer>/dataset=<dataset>/<shard>.parquet``, one row per sample, written
atomically with the scorer's config hash, the shard's version and its checksum). Planning reads
metadata only: a rerun skips every file whose config hash and shard version (size and mtime, or
ETag, from a listing) match (:func:`plan_tasks`), so a killed run resumes where it stopped and a
changed scorer or shard is scored again, and the driver reads no shard bytes.

Scorers that run on the same kind of device score in one fused pass (:func:`run_pass`,
``curation.scoring.fused``): a worker reads, hashes and decodes each shard once and feeds every
scorer that still needs it. Workers are Ray actors (``curation.scoring.workers``; ``ray.init()``
locally, or the cluster in ``RAY_ADDRESS``): models load once per actor, decoding runs on
``decode_workers`` threads beside the model, and a shard whose scoring fails is retried, then
reported with its error while every other shard completes. :func:`score_local_pass` does the
same in this process, without Ray.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from curation.data import storage
from curation.data.shards import checksum_algo, file_checksum, shard_name
from curation.scoring.fused import PassOptions, score_shard_pass
from curation.scoring.scorefile import ShardResult, ShardTask, is_done, read_score_metadata, score_file_url
from curation.scoring.catalog import refresh as refresh_catalog
from scorers import build_scorer
from scorers.base import Scorer

__all__ = ["ScorerSpec", "ShardTask", "ShardResult", "RunReport", "SourceConflictError", "plan_tasks", "run_scoring",
           "run_pass", "score_local", "score_local_pass", "score_file_url", "ProgressFn", "read_score_metadata", "to_json"]


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
    decode_workers: int = 1  # threads that read, decode and prepare batches beside the model
    prefetch: int = 2  # prepared batches waiting ahead of the model

    def build(self) -> Scorer:
        return build_scorer(self.name, **self.params)


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


class SourceConflictError(ValueError):
    """Two input shards that would share one score file (same dataset, same shard name)."""


def _legacy_match(t: ShardTask, md: dict[str, str], storage_options: dict[str, Any] | None) -> bool:
    """A score file written before versions were recorded: the driver hashes the shard once, the
    old way, with the hash its checksum was made with (md5, sha256 or blake3 from older versions, xxh128)."""
    recorded = md.get("shard_checksum") or ""
    if not recorded or storage.is_remote(t.url):
        return bool(recorded) and recorded == t.version  # on a store the ETag was the checksum
    try:
        return file_checksum(t.url, storage_options, checksum_algo(recorded))[1] == recorded
    except FileNotFoundError:
        return False


def plan_tasks(tasks: list[ShardTask], scorer: Scorer, work: str,
               storage_options: dict[str, Any] | None = None) -> tuple[list[ShardTask], list[ShardResult]]:
    """Split into (to score, already done) from metadata only: each shard's version (size and
    mtime, or ETag, from one listing per folder) against the one its score file recorded, and
    the scorer's config hash. No shard byte is read here: the worker that scores a shard hashes
    it as it reads. Two sources with one identity (dataset, shard name), in this run or in a
    score file an earlier run wrote, are refused before anything is scored, naming both."""
    todo, done, conflicts = [], [], []
    claimed: dict[str, str] = {}  # score file -> the shard url of this run that claims it
    h = scorer.config_hash()
    stats = storage.stat_files([t.url for t in tasks if t.version is None], storage_options)
    for t in tasks:
        if t.version is None and t.url in stats:
            t = replace(t, version=stats[t.url][1])
        out = score_file_url(work, scorer.name, t.dataset, shard_name(t.url))
        md = read_score_metadata(out, storage_options)
        other = claimed.setdefault(out, t.url)
        other = md["shard_url"] if other == t.url and md and md.get("shard_url") else other
        if other != t.url:
            conflicts.append(f"{t.dataset}/{shard_name(t.url)} is both {other} and {t.url}")
            continue
        legacy = md is not None and "shard_version" not in md and md.get("config_hash") == h
        if is_done(md, h, t.version) or (legacy and _legacy_match(t, md, storage_options)):
            done.append(ShardResult(t.url, t.dataset, out, rows=int(md.get("rows", 0)), skipped=True, scorer=scorer.name))
        else:
            todo.append(t)
    if conflicts:
        raise SourceConflictError(f"{scorer.name}: two sources share a dataset and shard name: {'; '.join(conflicts[:5])}"
                                  f". Give one another dataset name, or remove its old score files under {work}")
    return todo, done


ProgressFn = Callable[[ShardResult, int, int], None]  # (result, shards done, shards total)


@dataclass
class PassWork:
    """What one fused pass has to do: per shard, the scorers that still need it."""

    reports: dict[str, RunReport]
    items: list[tuple[ShardTask, list[str]]]
    record: Callable[[ShardResult], None]


def _start(tasks: list[ShardTask], specs: list[ScorerSpec], work: str, progress: ProgressFn | None) -> PassWork:
    """Each scorer's report (the finished shards already recorded), the shards still to score with
    the scorers that need each, and the function that records a shard's result (and reports progress)."""
    reports: dict[str, RunReport] = {}
    need: dict[str, tuple[ShardTask, list[str]]] = {}
    for spec in specs:
        scorer = spec.build()  # for its identity; the model loads in the workers
        reports[spec.name] = RunReport(spec.name, scorer.config_hash(), work)
        todo, done = plan_tasks(tasks, scorer, work)
        for r in done:
            reports[spec.name].shards.append(r)
            if progress:
                progress(r, len(reports[spec.name].shards), len(tasks))
        for t in todo:
            need.setdefault(t.url, (t, []))[1].append(spec.name)

    def record(result: ShardResult) -> None:
        rep = reports[result.scorer]
        rep.shards.append(result)
        if progress:
            progress(result, len(rep.shards), len(tasks))

    return PassWork(reports, list(need.values()), record)


def pass_options(specs: list[ScorerSpec]) -> PassOptions:
    return PassOptions(max(s.batch_size for s in specs), max(s.decode_workers for s in specs),
                       max(s.prefetch for s in specs))


def run_pass(tasks: list[ShardTask], specs: list[ScorerSpec], work: str, *, progress: ProgressFn | None = None,
             ray_address: str | None = None, num_cpus: int | None = None) -> list[RunReport]:
    """Score ``tasks`` with several scorers in one fused pass on Ray (each shard read, hashed and
    decoded once per worker for all of them); one report per scorer, in ``specs`` order."""
    from curation.common.raycluster import ensure_ray
    from curation.scoring.workers import WorkerPool

    t0 = time.time()
    pw = _start(tasks, specs, work, progress)
    if pw.items:
        ensure_ray(num_cpus, ray_address)
        pool = WorkerPool(specs, min(max(s.workers for s in specs), len(pw.items)), pass_options(specs))
        try:
            pool.run(pw.items, work, pw.record)
        finally:
            pool.close()
    return _finish(pw, specs, work, t0)


def run_scoring(tasks: list[ShardTask], spec: ScorerSpec, work: str, *, progress: ProgressFn | None = None,
                ray_address: str | None = None, num_cpus: int | None = None) -> RunReport:
    """Score ``tasks`` with one scorer on Ray; return what was scored, skipped and failed."""
    return run_pass(tasks, [spec], work, progress=progress, ray_address=ray_address, num_cpus=num_cpus)[0]


def score_local_pass(tasks: list[ShardTask], specs: list[ScorerSpec], work: str,
                     progress: ProgressFn | None = None) -> list[RunReport]:
    """The same as :func:`run_pass` in this process, without Ray (notebooks, debugging, proxies)."""
    t0 = time.time()
    pw = _start(tasks, specs, work, progress)
    built: dict[str, Scorer] = {}
    opts = pass_options(specs)
    for task, names in pw.items:
        for n in names:
            if n not in built:
                built[n] = next(s for s in specs if s.name == n).build()
                built[n].setup()
        jobs = [(built[n], score_file_url(work, n, task.dataset, shard_name(task.url))) for n in names]
        try:
            results = score_shard_pass(jobs, task, opts)
        except Exception as e:  # noqa: BLE001
            results = [ShardResult(task.url, task.dataset, out, failed=f"{type(e).__name__}: {e}", scorer=sc.name)
                       for sc, out in jobs]
        for r in results:
            pw.record(r)
    return _finish(pw, specs, work, t0)


def _finish(pw: Any, specs: list[ScorerSpec], work: str, t0: float) -> list[RunReport]:
    """Each scorer's report, timed; each scorer's store catalog refreshed (``catalog.py``)."""
    for r in pw.reports.values():
        r.seconds = time.time() - t0
    for s in specs:
        refresh_catalog(storage.join(work, "scores", s.name))  # the store's index of score files
    return [pw.reports[s.name] for s in specs]


def score_local(tasks: list[ShardTask], spec: ScorerSpec, work: str, progress: ProgressFn | None = None) -> RunReport:
    """The same as :func:`run_scoring` in this process, without Ray (notebooks, debugging)."""
    return score_local_pass(tasks, [spec], work, progress)[0]


def to_json(report: RunReport) -> str:
    return json.dumps({**report.summary(), "shard_results": [asdict(s) for s in report.shards]}, indent=2)
