"""Where a training worker runs, and the few collectives the trainer needs across ranks."""

from __future__ import annotations

from typing import Any

import torch


class NoGPUError(RuntimeError):
    pass


def stage_device(use_gpu: bool, on_ray: bool) -> torch.device:
    """Where this worker trains: Ray Train's device on a Ray worker; else the first GPU when
    asked for. Asking for a GPU where there is none is an error, not a silent CPU run."""
    if on_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu and (device.type != "cuda" or not torch.cuda.is_available()):
        raise NoGPUError(f"use_gpu is set but this worker has no CUDA device (device {device})")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Model inputs (tensors and every media item's tiles) on ``device``."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["media"] = [[m.to(device) for m in ms] for ms in batch["media"]]
    return out


def all_sum(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
    return x


def all_positions(position: int, world_size: int, device: torch.device) -> list[int]:
    if world_size == 1:
        return [position]
    import torch.distributed as dist

    mine = torch.tensor([position], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]
