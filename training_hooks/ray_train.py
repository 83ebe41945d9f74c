"""NVILA stages on Ray Train: one worker group runs every stage of a training run, in order.

A ``TorchTrainer`` starts its worker group (Ray actors, the process group, each worker's torch
import) once; on 2 cores that costs ~18 s, so a group per stage cost ~90 s over NVILA's five
stages. Here the train loop runs the stages in sequence: each stage is ``trainer.run_stage``
exactly as before (its own model built from the previous stage's ``final/``, its modules frozen
as the stage says, its optimizer, checkpoints, ``final/`` and ``metrics.json``), and with several
workers every rank waits at a barrier until rank 0 has written the ``final/`` the next stage
loads. DDP on 2 workers wraps each stage's model afresh in the same process group.

Progress: Ray Train keeps its workers' reports until the run ends, so the driver follows the
run through the files it already writes: a thread watches each stage's ``metrics.json`` (written
atomically by rank 0 when the stage is done) and reports the stage as it lands.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Optional

from training_hooks.trainer import run_stage

Callback = Optional[Callable[[dict[str, Any]], None]]


def _ray_train_loop(config: dict[str, Any]) -> None:
    """What every worker runs: the stages in order, a barrier after each when there are several ranks."""
    import gc

    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    for stage in config["stages"]:
        result = run_stage(dict(stage, on_ray=True), rank, world)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0 has written final/, which the next stage starts from
        ray.train.report({"stage": result["stage"], "steps": result["steps"]})
        gc.collect()  # the stage's model and optimizer go before the next stage builds its own


def _metrics_path(cfg: dict[str, Any]) -> str:
    return os.path.join(cfg["stage_dir"], "metrics.json")


def _version(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class StageWatcher:
    """Calls ``started(cfg)`` as each stage begins and ``done(result)`` as each ends (its
    ``metrics.json`` rewritten since the run began), in stage order, from a thread; ``finish()``
    reports whatever the thread had not yet seen."""

    def __init__(self, configs: list[dict[str, Any]], started: Callback, done: Callback, interval: float = 0.5) -> None:
        self.configs, self.started, self.done, self.interval = configs, started, done, interval
        self.before = [_version(_metrics_path(c)) for c in configs]
        self.next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-train-stages", daemon=True)

    def __enter__(self) -> "StageWatcher":
        if self.started and self.configs:
            self.started(self.configs[0])
        self._thread.start()
        return self

    def _poll(self) -> None:
        with self._lock:
            while self.next < len(self.configs):
                cfg = self.configs[self.next]
                version = _version(_metrics_path(cfg))
                if version is None or version == self.before[self.next]:
                    return
                with open(_metrics_path(cfg)) as f:
                    result = json.load(f)
                self.next += 1
                if self.done:
                    self.done(result)
                if self.started and self.next < len(self.configs):
                    self.started(self.configs[self.next])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self._poll()


def run_stages_on_ray(configs: list[dict[str, Any]], num_workers: int = 1, use_gpu: bool = False,
                      address: str | None = None, started: Callback = None, done: Callback = None) -> list[dict[str, Any]]:
    """Run ``configs`` (one per stage, in order; each ``init_dir`` the previous stage's ``final/``)
    in one Ray Train ``TorchTrainer`` worker group (DDP when several workers; gloo on CPUs, NCCL on
    GPUs, as Ray Train sets up). Returns each stage's ``metrics.json``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from curation.common.raycluster import ensure_ray

    ensure_ray(address=address)
    cfgs = [dict(c, use_gpu=use_gpu, threads=c.get("threads") or 1) for c in configs]
    threads = max(c["threads"] for c in cfgs)
    storage = os.path.commonpath([os.path.abspath(c["stage_dir"]) for c in cfgs])  # the stage's own dir for one stage
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"stages": cfgs},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": threads, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name="nvila-" + "-".join(c["plan"]["name"] for c in cfgs),
                             storage_path=os.path.join(storage, "ray_results")),
    )
    with StageWatcher(cfgs, started, done):
        trainer.fit()
    results = []
    for c in cfgs:
        with open(_metrics_path(c)) as f:
            results.append(json.load(f))
    return results


def run_stage_on_ray(config: dict[str, Any], num_workers: int = 1, use_gpu: bool = False,
                     address: str | None = None) -> dict[str, Any]:
    """One stage on its own Ray Train worker group."""
    return run_stages_on_ray([config], num_workers, use_gpu, address)[0]
