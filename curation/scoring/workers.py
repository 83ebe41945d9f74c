"""A pool of Ray actors that score shards, each holding one scorer with its model loaded once.

Shards are handed to free actors one at a time. A shard whose scoring fails is retried (up to
``ScorerSpec.max_retries``) unless the failure is permanent (an empty shard, not a tar); an
actor that died (OOM, segfault) is replaced. Every shard ends as exactly one ``ShardResult``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from curation.data.shards import ShardError, shard_name
from curation.scoring.scorefile import ShardResult, ShardTask, score_file_url, score_shard
from scorers import scorer_class

log = logging.getLogger(__name__)


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


class WorkerPool:
    """``n`` scoring actors for one scorer spec (a ``curation.scoring.engine.ScorerSpec``)."""

    def __init__(self, spec: Any, n: int) -> None:
        self.spec = spec
        self._cls = _make_worker_class()
        self.workers = [self._new() for _ in range(max(1, n))]

    def _new(self) -> Any:
        s = self.spec
        opts = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
        return self._cls.options(**opts).remote(s.name, s.params, max(1, int(s.num_cpus)), s.num_gpus)

    def run(self, todo: list[ShardTask], work: str, done: Callable[[ShardResult], None]) -> None:
        """Score every task in ``todo``; call ``done`` with each shard's final result."""
        import ray

        pending: list[tuple[ShardTask, int]] = [(t, 1) for t in todo]
        running: dict[Any, tuple[ShardTask, int, int]] = {}  # ref -> (task, attempt, worker index)
        free = list(range(len(self.workers)))
        while pending or running:
            while pending and free:
                task, attempt = pending.pop(0)
                w = free.pop(0)
                ref = self.workers[w].score.remote(task, self._out(work, task), self.spec.batch_size)
                running[ref] = (task, attempt, w)
            ref = ray.wait(list(running), num_returns=1)[0][0]
            task, attempt, w = running.pop(ref)
            free.append(w)
            result = self._collect(ref, task, attempt, w, work)
            if result is None:
                pending.append((task, attempt + 1))
            else:
                done(result)

    def _collect(self, ref: Any, task: ShardTask, attempt: int, w: int, work: str) -> ShardResult | None:
        """The shard's result, or None when it failed and is to be retried."""
        import ray

        try:
            result: ShardResult = ray.get(ref)
            result.attempts = attempt
            return result
        except Exception as e:  # noqa: BLE001 - the shard failed; others go on
            if isinstance(e, ray.exceptions.RayActorError):
                self.workers[w] = self._new()  # the actor died (OOM, segfault): replace it
            reason = short_error(e)
            if attempt <= self.spec.max_retries and not is_permanent(e):
                log.warning("scoring %s with %s failed (attempt %d), retrying: %s",
                            task.url, self.spec.name, attempt, reason)
                return None
            return ShardResult(task.url, task.dataset, self._out(work, task), failed=reason, attempts=attempt)

    def _out(self, work: str, task: ShardTask) -> str:
        return score_file_url(work, self.spec.name, task.dataset, shard_name(task.url))

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
