"""Caption-word pretraining of the vision tower on several CPU processes (data parallel).

The tower is tiny: one process on one torch thread leaves the other cores idle, and two torch
threads on the same small matmuls mostly wait on each other. Here ``workers`` processes (the
caller as rank 0, the others spawned) each take their share of every batch, and
``torch.distributed`` (gloo) averages the gradients (``DistributedDataParallel``). Every rank
draws the same batches from the same random state and takes batch items ``rank, rank + workers,
...``; each rank's loss is its share of the whole batch's loss (summed over its images, divided
by the whole batch), so the step is the single-process step on the whole batch, up to the order
of the float sums. The pairs are decoded once, by the caller: the spawned ranks get the image
tensors through shared memory (``torch.multiprocessing``). The ranks are spawned before that
(``SpawnedRanks``): their start-up overlaps the caller's.
"""

from __future__ import annotations

import os
import random
import tempfile
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training_hooks.vision_words import WordHead, multi_hot

TIMEOUT = timedelta(minutes=5)  # a rank that dies leaves the others waiting at most this long


class _Words(nn.Module):
    """The tower and the word head as one module, for DDP (``WordHead`` reads ``.vision_tower``)."""

    def __init__(self, tower: nn.Module, head: WordHead) -> None:
        super().__init__()
        self.vision_tower = tower
        self.head = head

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.head(self, views)


def _rank_loop(rank: int, world: int, model: Any, head: WordHead, views: torch.Tensor, ids: Sequence[list[int]],
               train: list[int], rng: random.Random, settings: dict[str, Any], info: Callable[[str], None]) -> list:
    from torch.nn.parallel import DistributedDataParallel

    from training_hooks.vision_pretrain import _batches, _train

    vocab, size = settings["vocab"], settings["batch_size"]
    # the layers after the feature layer, the post-layernorm and the pooling head never reach the
    # loss: left out of DDP's gradient averaging, so they stay untouched, as in one process
    unused = _unused(model.vision_tower)
    for p in unused:
        p.requires_grad_(False)
    net = DistributedDataParallel(_Words(model.vision_tower, head))

    def loss_of(batch: list[int]) -> torch.Tensor:
        mine = batch[rank::world]
        logits = net(views[torch.tensor(mine)])
        targets = multi_hot([ids[i] for i in mine], vocab)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(batch)

    try:
        return _train([*model.vision_tower.parameters(), *head.parameters()], loss_of, model,
                      _batches(rng, "words", list(ids), train, vocab, size, 1), settings["steps"], settings["lr"], info,
                      world=world)
    finally:
        for p in unused:
            p.requires_grad_(True)


def _unused(tower: Any) -> list[nn.Parameter]:
    """The tower's trainable parameters its output does not depend on (``VisionTower.forward``)."""
    layers = tower.model.encoder.layers
    used = [tower.model.embeddings, *layers[: tower.feature_layer % (len(layers) + 1)]]
    keep = {id(p) for m in used for p in m.parameters()}
    return [p for p in tower.parameters() if p.requires_grad and id(p) not in keep]


def _spawned_rank(rank: int, world: int, init: str, work: Any, threads: int) -> None:
    """A spawned rank: started before its work is known (its imports overlap the caller's set-up), it
    waits for it on ``work`` (a queue; None: nothing to do), then trains its own copy of the model
    (DDP starts it from rank 0's weights)."""
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from model import NVILAForCausalLM

    job = work.get()
    if job is None:
        return
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        model = NVILAForCausalLM.from_pretrained(job["model_dir"])
        head = WordHead(model.vision_tower.hidden_size, job["settings"]["vocab"])
        rng = random.Random()
        rng.setstate(job["rng_state"])
        _rank_loop(rank, world, model, head, job["views"], job["ids"], job["train"], rng, job["settings"], lambda s: None)
    finally:
        dist.destroy_process_group()


class SpawnedRanks:
    """Ranks ``1 .. workers - 1`` of a data-parallel pretraining, spawned at once and waiting for their
    work (``send``): a spawned interpreter takes seconds to import torch and the model, which it does
    while the caller builds the model and reads the pairs. ``close`` ends any that got no work."""

    def __init__(self, workers: int) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.workers = workers
        self._tmp = tempfile.TemporaryDirectory(prefix="vision-ddp-")
        self.init = os.path.join(self._tmp.name, "store")
        self._queues = [ctx.SimpleQueue() for _ in range(1, workers)]
        self.procs = [ctx.Process(target=_spawned_rank, args=(r, workers, self.init, q, torch.get_num_threads()),
                                  daemon=True) for r, q in zip(range(1, workers), self._queues)]
        self._sent = False
        for p in self.procs:
            p.start()

    def send(self, job: dict[str, Any]) -> None:
        for q in self._queues:
            q.put(job)
        self._sent = True

    def close(self) -> None:
        if not self._sent:
            self.send(None)  # type: ignore[arg-type]
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
        self._tmp.cleanup()

    def __enter__(self) -> "SpawnedRanks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train_words_parallel(model_dir: str, model: Any, head: WordHead, media: Sequence[torch.Tensor],
                         ids: Sequence[list[int]], train: list[int], rng: random.Random, *, vocab: int, steps: int,
                         batch_size: int, lr: float, workers: int, info: Callable[[str], None],
                         ranks: SpawnedRanks | None = None) -> list[dict[str, Any]]:
    """Train ``model``'s tower and ``head`` (rank 0, in this process) with ``workers - 1`` spawned
    ranks (``ranks``, started beforehand, or started here); ``model_dir`` holds the model the
    spawned ranks load. Returns the loss curve."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("data-parallel vision pretraining needs a process with no process group of its own")
    own = ranks is None
    ranks = SpawnedRanks(workers) if ranks is None else ranks
    if ranks.workers != workers:
        raise ValueError(f"{ranks.workers} ranks started for {workers} workers")
    views = torch.stack(list(media)).share_memory_()
    settings = {"vocab": vocab, "steps": steps, "batch_size": batch_size, "lr": lr}
    try:
        ranks.send({"model_dir": model_dir, "views": views, "ids": list(ids), "train": train,
                    "rng_state": rng.getstate(), "settings": settings})
        dist.init_process_group("gloo", init_method=f"file://{ranks.init}", rank=0, world_size=workers, timeout=TIMEOUT)
        try:
            curve = _rank_loop(0, workers, model, head, views, ids, train, rng, settings, info)
        finally:
            dist.destroy_process_group()
    finally:
        if own:
            ranks.close()
        else:
            for p in ranks.procs:
                p.join(timeout=60)
    failed = [p.exitcode for p in ranks.procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"a vision pretraining rank failed (exit codes {failed})")
    return curve
