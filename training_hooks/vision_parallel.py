"""Caption-word pretraining of the vision tower on several CPU processes (data parallel).

The tower is tiny: one process on one torch thread leaves the other cores idle, and two torch
threads on the same small matmuls mostly wait on each other. Here ``workers`` processes (the
caller as rank 0, the others spawned) each take their share of every batch, and
``torch.distributed`` (gloo) averages the gradients (``DistributedDataParallel``). Every rank
draws the same batches from the same random state and takes batch items ``rank, rank + workers,
...``; each rank's loss is its share of the whole batch's loss (summed over its images, divided
by the whole batch), so the step is the single-process step on the whole batch, up to the order
of the float sums. The pairs are decoded once, by the caller: the spawned ranks get the image
tensors through shared memory (``torch.multiprocessing``).
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


def _spawned_rank(rank: int, world: int, init: str, model_dir: str, views: torch.Tensor, ids: list[list[int]],
                  train: list[int], rng_state: Any, settings: dict[str, Any]) -> None:
    """A spawned rank: its own copy of the model (DDP starts it from rank 0's weights)."""
    import torch.distributed as dist

    from model import NVILAForCausalLM

    torch.set_num_threads(settings["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        model = NVILAForCausalLM.from_pretrained(model_dir)
        head = WordHead(model.vision_tower.hidden_size, settings["vocab"])
        rng = random.Random()
        rng.setstate(rng_state)
        _rank_loop(rank, world, model, head, views, ids, train, rng, settings, lambda s: None)
    finally:
        dist.destroy_process_group()


def train_words_parallel(model_dir: str, model: Any, head: WordHead, media: Sequence[torch.Tensor],
                         ids: Sequence[list[int]], train: list[int], rng: random.Random, *, vocab: int, steps: int,
                         batch_size: int, lr: float, workers: int, info: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train ``model``'s tower and ``head`` (rank 0, in this process) with ``workers - 1`` spawned
    ranks; ``model_dir`` holds the model the spawned ranks load. Returns the loss curve."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("data-parallel vision pretraining needs a process with no process group of its own")
    views = torch.stack(list(media)).share_memory_()
    settings = {"vocab": vocab, "steps": steps, "batch_size": batch_size, "lr": lr, "threads": torch.get_num_threads()}
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="vision-ddp-") as tmp:
        init = os.path.join(tmp, "store")
        ranks = [ctx.Process(target=_spawned_rank, args=(r, workers, init, model_dir, views, list(ids), train,
                                                          rng.getstate(), settings), daemon=True)
                 for r in range(1, workers)]
        for p in ranks:
            p.start()
        try:
            dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=workers, timeout=TIMEOUT)
            try:
                curve = _rank_loop(0, workers, model, head, views, ids, train, rng, settings, info)
            finally:
                dist.destroy_process_group()
        finally:
            for p in ranks:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    failed = [p.exitcode for p in ranks if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"a vision pretraining rank failed (exit codes {failed})")
    return curve
