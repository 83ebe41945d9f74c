"""Stage checkpoints that load without unpickling code.

A checkpoint directory ``checkpoints/step-N`` holds:

- ``model.safetensors``: the weights;
- ``state.pt``: the optimizer state and the RNG states, tensors and plain containers only,
  written with ``torch.save`` and read back with ``torch.load(weights_only=True)`` (which
  refuses anything but tensors, numbers, strings and containers);
- ``state.json``: step, the data stream position of every rank, the scheduler state and the
  metrics so far.

It is written under a temporary name and renamed when complete, so a process killed while
writing leaves either the previous checkpoint or the new one, never half of one. The last two
are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.pt"
INFO_FILE = "state.json"


class CheckpointMismatch(RuntimeError):
    pass


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON so that a reader (or a killed writer) never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(stage_dir: str, step: int, model: Any, optimizer: Any, scheduler: Any, info: dict[str, Any],
                    keep: int = 2) -> str:
    """Write ``checkpoints/step-N`` (see the module doc); ``info`` must be JSON-serializable."""
    from safetensors.torch import save_model

    root = os.path.join(stage_dir, "checkpoints")
    d = os.path.join(root, f"step-{step:06d}")
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, MODEL_FILE))  # handles tied embeddings
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, os.path.join(tmp, TENSORS_FILE))
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
        json.dump({"step": step, "scheduler": scheduler.state_dict(), **info}, f)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    done = sorted(x for x in os.listdir(root) if x.startswith("step-") and not x.endswith(".tmp"))
    for x in done[:-keep]:
        shutil.rmtree(os.path.join(root, x), ignore_errors=True)
    return d


def latest_checkpoint(stage_dir: str) -> str | None:
    root = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = [x for x in os.listdir(root) if x.startswith("step-") and not x.endswith(".tmp")
            and os.path.isfile(os.path.join(root, x, INFO_FILE))]
    return os.path.join(root, max(done, key=lambda x: int(x.split("-")[1]))) if done else None


def load_checkpoint(path: str, model: Any, optimizer: Any, scheduler: Any, world_size: int) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns its info (step,
    positions, metrics). A checkpoint of another number of ranks is refused: the data split
    would not continue where it stopped."""
    from safetensors.torch import load_model

    with open(os.path.join(path, INFO_FILE)) as f:
        info = json.load(f)
    saved_world = len(info["positions"])
    if saved_world != world_size:
        raise CheckpointMismatch(f"{path} was written by a run with {saved_world} worker(s); resume it with the same "
                                 f"number of workers (now {world_size}) or delete {os.path.dirname(path)} to restart")
    load_model(model, os.path.join(path, MODEL_FILE))
    tensors = torch.load(os.path.join(path, TENSORS_FILE), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(tensors["optimizer"])  # moves the state to the parameters' device
    scheduler.load_state_dict(info["scheduler"])
    set_rng_state(tensors["rng"])
    return info
