"""The scoring engine: scorers over shards, on Ray, resumable, exactly once.

For each scorer, every input shard becomes one score file (``curation.scoring.scorefile``:
``<work>/scores/<scorer>/dataset=<dataset>/<shard>.parquet``, one row per sample, written
atomically with the scorer's config hash and the shard's checksum). A rerun skips every file
whose hash and checksum match (:func:`plan_tasks`), so a killed run resumes where it stopped and
a changed scorer or shard is scored again.

Workers are Ray actors (``curation.scoring.workers``; ``ray.init()`` locally, or the cluster in
``RAY_ADDRESS``): a model loads once per actor, decoding overlaps the model inside each actor,
and a shard whose scoring fails is retried, then reported with its error while every other
shard completes. :func:`score_local` does the same in this process, without Ray.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from curation.data import storage
from curation.data.shards import checksum_algo, file_checksum, shard_name
from curation.scoring.catalog import refresh as refresh_catalog
from curation.scoring.scorefile import ShardResult, ShardTask, is_done, read_score_metadata, score_file_url, score_shard
from scorers import build_scorer
from scorers.base import Scorer

__all__ = ["ScorerSpec", "ShardTask", "ShardResult", "RunReport", "SourceConflictError", "plan_tasks", "run_scoring",
           "score_local", "score_file_url", "ProgressFn", "read_score_metadata", "to_json"]


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


def plan_tasks(tasks: list[ShardTask], scorer: Scorer, work: str,
               storage_options: dict[str, Any] | None = None) -> tuple[list[ShardTask], list[ShardResult]]:
    """Fill in shard checksums; split into (to score, already done). Two sources with one
    identity (dataset, shard name), in this run or in a score file an earlier run wrote, are
    refused before anything is scored, naming both: one would overwrite the other."""

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
        algo = "sha256"
        if t.checksum is None:
            # a shard an earlier version scored has an md5 on record: compare like with like
            algo = checksum_algo(md["shard_checksum"]) if md and md.get("shard_checksum") else "sha256"
            t = ShardTask(t.url, t.dataset, t.kind, file_checksum(t.url, storage_options, algo)[1])
        if is_done(md, h, t.checksum):
            done.append(ShardResult(t.url, t.dataset, out, rows=int(md.get("rows", 0)), skipped=True))
        else:
            if algo != "sha256" and not storage.is_remote(t.url):
                t = ShardTask(t.url, t.dataset, t.kind, file_checksum(t.url, storage_options)[1])  # rescored: sha256
            todo.append(t)
    if conflicts:
        raise SourceConflictError(f"{scorer.name}: two sources share a dataset and shard name: {'; '.join(conflicts[:5])}"
                                  f". Give one another dataset name, or remove its old score files under {work}")
    return todo, done


ProgressFn = Callable[[ShardResult, int, int], None]  # (result, shards done, shards total)


def _start(tasks: list[ShardTask], spec: ScorerSpec, work: str, progress: ProgressFn | None
           ) -> tuple[RunReport, Callable[[ShardResult], None], list[ShardTask], Scorer]:
    """A run's report, the function that records each shard's result in it (and reports
    progress), the shards still to score (the finished ones already recorded), and the scorer
    (built for its identity; ``setup`` not called)."""
    scorer = spec.build()
    report = RunReport(spec.name, scorer.config_hash(), work)

    def record(result: ShardResult) -> None:
        report.shards.append(result)
        if progress:
            progress(result, len(report.shards), len(tasks))

    todo, done = plan_tasks(tasks, scorer, work)
    for r in done:
        record(r)
    return report, record, todo, scorer


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
    from curation.common.raycluster import ensure_ray
    from curation.scoring.workers import WorkerPool

    t0 = time.time()
    report, record, todo, _ = _start(tasks, spec, work, progress)  # the model loads in the workers
    if todo:
        ensure_ray(num_cpus, ray_address)
        pool = WorkerPool(spec, min(spec.workers, len(todo)))
        try:
            pool.run(todo, work, record)
        finally:
            pool.close()
    report.seconds = time.time() - t0
    refresh_catalog(storage.join(work, "scores", spec.name))  # the store's index of score files (catalog.py)
    return report


def score_local(tasks: list[ShardTask], spec: ScorerSpec, work: str, progress: ProgressFn | None = None) -> RunReport:
    """The same as :func:`run_scoring` in this process, without Ray (notebooks, debugging)."""
    t0 = time.time()
    report, record, todo, scorer = _start(tasks, spec, work, progress)
    if todo:
        scorer.setup()
    for task in todo:
        out = score_file_url(work, spec.name, task.dataset, shard_name(task.url))
        try:
            result = score_shard(scorer, task, out, spec.batch_size)
        except Exception as e:  # noqa: BLE001
            result = ShardResult(task.url, task.dataset, out, failed=f"{type(e).__name__}: {e}")
        record(result)
    report.seconds = time.time() - t0
    refresh_catalog(storage.join(work, "scores", spec.name))  # the store's index of score files (catalog.py)
    return report


def to_json(report: RunReport) -> str:
    return json.dumps({**report.summary(), "shard_results": [asdict(s) for s in report.shards]}, indent=2)
