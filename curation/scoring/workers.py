"""A pool of Ray actors that score shards, each holding the scorers of one pass, models loaded once.

Shards are handed to free actors one at a time, each with the scorers that still need it (a
fused pass: one read, one decode, every scorer fed; ``curation.scoring.fused``). A shard whose
scoring fails is retried, for the scorers it failed for (up to ``max_retries``), unless the
failure is permanent (an empty shard, not a tar); an actor that died (OOM, segfault) is
replaced. Every (shard, scorer) ends as exactly one ``ShardResult``.

Actors are sized from the pass's specs: ``num_cpus`` and ``num_gpus`` per actor, so Ray places
one actor per GPU when each asks for a whole one (``gpu_workers`` counts them).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from curation.data.shards import ShardError, shard_name
from curation.scoring.fused import PassOptions, score_shard_pass
from curation.scoring.scorefile import ShardResult, ShardTask, score_file_url
from scorers import scorer_class

log = logging.getLogger(__name__)

# seconds an actor may take to be placed and load its models before the shards left fail
DEFAULT_START_TIMEOUT = 900.0


def _make_worker_class():
    import ray

    @ray.remote
    class ScoringWorker:
        """Holds the set-up scorers of one pass (models loaded once) and scores shards with them."""

        def __init__(self, scorers: list[tuple[str, dict[str, Any]]], threads: int, gpus: float, opts: PassOptions) -> None:
            import inspect

            import torch

            torch.set_num_threads(max(1, threads))
            self.opts = opts
            self.scorers = {}
            for name, params in scorers:
                params = dict(params)
                cls = scorer_class(name)
                if gpus > 0 and "device" not in params and "device" in inspect.signature(cls.__init__).parameters:
                    params["device"] = "cuda"  # a worker given a GPU uses it unless told otherwise
                self.scorers[name] = cls(**params)
                self.scorers[name].setup()

        def ready(self) -> bool:
            return True

        def score(self, task: ShardTask, jobs: list[tuple[str, str]]) -> list[ShardResult]:
            results = score_shard_pass([(self.scorers[n], out) for n, out in jobs], task, self.opts)
            node = ray.get_runtime_context().get_node_id()
            for r in results:
                r.node = node
            return results

    return ScoringWorker


def gpu_workers(requested: int, num_gpus: float) -> int:
    """Actors for a pass whose actors each take ``num_gpus``: at most as many as the cluster's
    GPUs hold (one per GPU for ``num_gpus: 1``), and never more than asked for."""
    import ray

    if num_gpus <= 0:
        return requested
    total = float(ray.cluster_resources().get("GPU", 0))
    return max(1, min(requested, int(total // num_gpus))) if total else requested


class WorkerPool:
    """``n`` scoring actors for the specs of one pass (``curation.scoring.engine.ScorerSpec``)."""

    def __init__(self, specs: list[Any], n: int, opts: PassOptions) -> None:
        self.specs = {s.name: s for s in specs}
        self.opts = opts
        self.num_cpus = max(s.num_cpus for s in specs)
        self.num_gpus = max(s.num_gpus for s in specs)
        self.max_retries = max(s.max_retries for s in specs)
        self._cls = _make_worker_class()
        self.workers = [self._new() for _ in range(gpu_workers(max(1, n), self.num_gpus))]

    def _new(self) -> Any:
        opts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        scorers = [(s.name, s.params) for s in self.specs.values()]
        return self._cls.options(**opts).remote(scorers, max(1, int(self.num_cpus)), self.num_gpus, self.opts)

    def run(self, items: list[tuple[ShardTask, list[str]]], work: str, done: Callable[[ShardResult], None]) -> None:
        """Score every (shard, scorers) item; call ``done`` with each (shard, scorer)'s final result.

        An actor gets shards once it is up: one whose node was lost may never be placed (no free
        CPU left), and the shards go on on the actors that are left. When no actor is up or
        scoring and none starts within ``start_timeout`` seconds (every node lost, or workers
        asking for more than the cluster has), the shards left fail with that reason instead of
        waiting forever."""
        import ray

        pending: list[tuple[ShardTask, list[str], int]] = [(t, names, 1) for t, names in items]
        running: dict[Any, tuple[ShardTask, list[str], int, int]] = {}  # ref -> (task, names, attempt, worker)
        free: list[int] = []
        starting = {w.ready.remote(): i for i, w in enumerate(self.workers)}  # its ready() -> worker slot
        while pending or running:
            while pending and free:
                task, names, attempt = pending.pop(0)
                w = free.pop(0)
                ref = self.workers[w].score.remote(task, [(n, self._out(work, task, n)) for n in names])
                running[ref] = (task, names, attempt, w)
            waiting = list(running) + list(starting)
            ready = ray.wait(waiting, num_returns=1, timeout=None if running else self.start_timeout)[0]
            if not ready:
                self._fail_unplaced(pending, work, done)
                return
            ref = ready[0]
            if ref in starting:
                free.append(starting.pop(ref))  # up, or failed to start: its first shard tells which
                continue
            task, names, attempt, w = running.pop(ref)
            actor = self.workers[w]
            retry = self._collect(ref, task, names, attempt, w, work, done)
            if self.workers[w] is actor:
                free.append(w)
            else:
                starting[self.workers[w].ready.remote()] = w
            if retry:
                pending.append((task, retry, attempt + 1))

    @property
    def start_timeout(self) -> float:
        return float(os.environ.get("CURATION_WORKER_START_TIMEOUT", DEFAULT_START_TIMEOUT))

    def _fail_unplaced(self, pending: list[tuple[ShardTask, list[str], int]], work: str,
                       done: Callable[[ShardResult], None]) -> None:
        """No scoring worker started in time: every shard left fails, naming what was asked and what the cluster has."""
        import ray

        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        reason = (f"no scoring worker started within {self.start_timeout:g} s (CURATION_WORKER_START_TIMEOUT): "
                  f"each asks for num_cpus={self.num_cpus:g}, num_gpus={self.num_gpus:g}; the cluster has {free or 'none'} "
                  f"free (lost nodes, or workers larger than any node?)")
        log.error("%s; %d shards not scored", reason, len(pending))
        for task, names, attempt in pending:
            for n in names:
                done(ShardResult(task.url, task.dataset, self._out(work, task, n), failed=reason, attempts=attempt, scorer=n))
        pending.clear()

    def _collect(self, ref: Any, task: ShardTask, names: list[str], attempt: int, w: int, work: str,
                 done: Callable[[ShardResult], None]) -> list[str]:
        """Hand finished results to ``done``; the scorers to retry the shard with."""
        import ray

        try:
            results: list[ShardResult] = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the shard failed; others go on
            if isinstance(e, ray.exceptions.RayActorError):
                self.workers[w] = self._new()  # the actor died (OOM, segfault): replace it
            reason = short_error(e)
            if attempt <= self.max_retries and not is_permanent(e):
                log.warning("scoring %s with %s failed (attempt %d), retrying: %s", task.url, names, attempt, reason)
                return names
            for n in names:
                done(ShardResult(task.url, task.dataset, self._out(work, task, n), failed=reason, attempts=attempt, scorer=n))
            return []
        retry = []
        for r in results:
            r.attempts = attempt
            if r.failed and attempt <= self.max_retries:
                log.warning("scoring %s with %s failed (attempt %d), retrying: %s", task.url, r.scorer, attempt, r.failed)
                retry.append(r.scorer)
            else:
                done(r)
        return retry

    def _out(self, work: str, task: ShardTask, name: str) -> str:
        return score_file_url(work, name, task.dataset, shard_name(task.url))

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)


def is_permanent(e: BaseException) -> bool:
    """A shard that is empty or not a tar fails the same way every time: no retry."""
    return isinstance(getattr(e, "cause", None) or e, ShardError)


def short_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
