"""One NVILA training stage: the loop, its checkpoints, its metrics; run in-process or by a Ray
Train worker (``training_hooks.ray_train``: one worker group runs a whole training run's stages).

Each stage loads the previous stage's final directory (or the recipe's ``init``), freezes what
the stage does not train, optionally converts the trainable linears to FP8, puts the model on
the worker's device (Ray Train's device on a Ray worker: a GPU when the job asked for them), and
trains with AdamW (vision tower at a lower LR where the LLM also trains), linear warmup then
cosine decay, and gradient clipping. With several workers the model is wrapped in DDP and each
rank takes its share of one mixed sample stream; the loss is normalized by the label tokens of
the whole step across ranks, so ``n`` workers with batch ``b`` follow the loss curve of one
worker with batch ``n * b``. ``precision: bf16`` runs forward and loss under bf16 autocast.

Every ``save_every`` steps rank 0 writes ``checkpoints/step-N`` (``training_hooks.checkpoint``:
weights, optimizer, scheduler, RNG, every rank's stream position; nothing is unpickled on load);
a killed stage resumes from the last one and continues the same loss curve. At the end rank 0
writes ``final/`` (an NVILA directory the next stage starts from), ``metrics.json`` (loss, LR,
tokens/s per step; held-out loss per data kind) and ``loss.png``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from curation.common.prefetch import prefetch
from model.examples import ExampleBuilder
from training_hooks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from training_hooks.device import all_positions, all_sum, stage_device, to_device
from training_hooks.data import (DataSplit, MemoBuild, batches, example_stream, stage_sources, stage_total_steps,
                                 stream_samples)
from training_hooks.recipe import StagePlan

IGNORE_INDEX = -100


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def freeze_for(model: Any, train: list[str]) -> dict[str, int]:
    """requires_grad only on the modules the stage trains; returns trainable params per group."""
    counts = {}
    for name, module in model.module_groups().items():
        on = name in train
        for p in module.parameters():
            p.requires_grad_(on)
        counts[name] = sum(p.numel() for p in module.parameters()) if on else 0
    return counts


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- the stage


def _optimizer(model: Any, plan: StagePlan, fp8: dict[str, Any]) -> Any:
    vision_params = [p for p in model.vision_tower.parameters() if p.requires_grad]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("vision_tower.")]
    groups = [g for g in ({"params": other, "lr": plan.lr}, {"params": vision_params, "lr": plan.vision_lr()}) if g["params"]]
    if fp8.get("optimizer_states"):
        from model.fp8 import fp8_optimizer

        return fp8_optimizer(groups, lr=plan.lr, weight_decay=plan.weight_decay)
    return torch.optim.AdamW(groups, lr=plan.lr, weight_decay=plan.weight_decay)


def _build(config: dict[str, Any], plan: StagePlan, device: torch.device) -> tuple[Any, Any, dict, Any]:
    """The stage's model (frozen as the stage says, FP8 if asked, on ``device``) and tokenizer."""
    from model import NVILAForCausalLM
    from model.nvila import load_tokenizer

    model = NVILAForCausalLM.from_pretrained(config["init_dir"])
    tok = load_tokenizer(config["init_dir"])
    trainable = freeze_for(model, plan.train)
    if plan.vision_tune != "full" or plan.lora:
        from training_hooks.efficient import apply_efficient

        trainable = apply_efficient(model, plan.vision_tune, plan.lora)
    fp8 = config.get("fp8") or {}
    fp8_summary = None
    if fp8.get("enabled"):
        from model.fp8 import convert_to_fp8

        # real FP8 matmuls where the GPU has them (compute capability >= 8.9), emulation elsewhere
        fp8_summary = convert_to_fp8(model, fp8.get("recipe", "tensorwise"), emulate=fp8.get("emulate"))
    return model.to(device), tok, trainable, fp8_summary


def _train_step(model: Any, opt: Any, sched: Any, batch: dict, plan: StagePlan, ctx: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step; the loss is the mean over the label tokens of all ranks' batches."""
    world, device = ctx["world_size"], ctx["device"]
    n_local = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(device)
    n_global = all_sum(n_local.float(), world).clamp_min(1)
    inputs = to_device(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["bf16"]):
        # DDP averages gradients over ranks: scale so that the average is the gradient of
        # sum(token losses of the step) / n_global, what one worker with the whole batch computes
        loss = model(**inputs, num_items_in_batch=n_global / world).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], plan.grad_clip)
    opt.step()
    sched.step()
    step_loss = all_sum(loss.detach(), world) / world
    return {"loss": float(step_loss), "grad_norm": float(grad_norm)}


@dataclass
class _Stage:
    """Everything one stage's loop needs, built once per worker."""

    plan: StagePlan
    manifest: Any
    core: Any  # the model (unwrapped; DDP wraps it for the loop)
    tok: Any
    opt: Any
    sched: Any
    sources: list
    total_steps: int
    device: Any
    trainable: int
    fp8_summary: Any


def _setup(config: dict[str, Any], world_size: int) -> _Stage:
    """Seed, threads, device; the model, optimizer, schedule and data sources of the stage."""
    from curation.selection.manifest import load_manifest

    plan = StagePlan(**config["plan"])
    os.makedirs(config["stage_dir"], exist_ok=True)
    torch.manual_seed(int(config.get("seed", 0)))
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    device = stage_device(bool(config.get("use_gpu")), bool(config.get("on_ray")))
    manifest = load_manifest(config["manifest"])
    core, tok, trainable, fp8_summary = _build(config, plan, device)
    opt = _optimizer(core, plan, config.get("fp8") or {})
    sources = stage_sources(manifest, plan.datasets, plan.heldout_every, plan.heldout_samples)
    total_steps = stage_total_steps(plan, manifest, sources, world_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(plan.warmup_steps, total_steps - 1), total_steps))
    return _Stage(plan, manifest, core, tok, opt, sched, sources, total_steps, device, trainable, fp8_summary)


def _resume(st: _Stage, stage_dir: str, rank: int, world_size: int) -> tuple[int, int, list]:
    """(first step, this rank's data position, metrics so far): from the latest checkpoint, if any."""
    ckpt = latest_checkpoint(stage_dir)
    if not ckpt:
        return 0, 0, []
    info = load_checkpoint(ckpt, st.core, st.opt, st.sched, world_size)
    return info["step"], info["positions"][rank], info["metrics"]


def _loop(st: _Stage, model: Any, stream: Any, start_step: int, metrics: list, stage_dir: str,
          ctx: dict[str, Any]) -> None:
    """Steps ``start_step`` to the end; rank 0 checkpoints every ``save_every`` steps and at the end."""
    plan, world_size, device = st.plan, ctx["world_size"], st.device
    for step in range(start_step, st.total_steps):
        t0 = time.time()
        batch = next(stream)
        out = _train_step(model, st.opt, st.sched, batch, plan, ctx)
        dt = time.time() - t0
        tokens = float(all_sum(torch.tensor(float(batch["llm_tokens"]), device=device), world_size))
        metrics.append({"step": step + 1, "loss": round(out["loss"], 5), "lr": st.opt.param_groups[0]["lr"],
                        "grad_norm": round(out["grad_norm"], 4), "tokens_per_s": round(tokens / dt, 1),
                        "samples_per_s": round(plan.batch_size * world_size / dt, 2)})
        if (step + 1) % plan.save_every == 0 or step + 1 == st.total_steps:
            positions = all_positions(batch["position"], world_size, device)  # every rank takes part
            if ctx["rank"] == 0:
                save_checkpoint(stage_dir, step + 1, st.core, st.opt, st.sched, {"positions": positions, "metrics": metrics})


def _wrap(core: Any, world_size: int) -> Any:
    if world_size == 1:
        return core
    import ray.train.torch

    # SigLIP's last layer and head never reach the loss (features come from layer -2)
    return ray.train.torch.prepare_model(core, move_to_device=False, parallel_strategy="ddp",
                                         parallel_strategy_kwargs={"find_unused_parameters": True})


def run_stage(config: dict[str, Any], rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """The training loop of one stage (what every Ray Train worker runs): set up, resume, loop, finish."""
    st = _setup(config, world_size)
    plan, stage_dir, seed = st.plan, config["stage_dir"], int(config.get("seed", 0))
    start_step, position, metrics = _resume(st, stage_dir, rank, world_size)
    model = _wrap(st.core, world_size)
    skipped, mixed_counts = Counter(), Counter()
    builder = ExampleBuilder(st.core, st.tok, plan.max_length, config.get("prompts") or ("Describe the image.",),
                             config.get("video_prompts") or ("Describe the video.",), skipped)
    examples = example_stream(st.sources, MemoBuild(builder), seed, rank, world_size, position, mixed_counts)
    stream = prefetch(batches(examples, plan.batch_size, st.tok.pad_token_id, plan.max_length))
    ctx = {"device": st.device, "world_size": world_size, "rank": rank, "bf16": config.get("precision") == "bf16"}
    model.train()
    t_stage = time.time()
    try:
        _loop(st, model, stream, start_step, metrics, stage_dir, ctx)
    finally:
        stream.close()
    result: dict[str, Any] = {"stage": plan.name, "steps": st.total_steps, "epochs": plan.epochs if not plan.steps else None,
                              "resumed_from": start_step, "world_size": world_size, "device": str(st.device),
                              "trainable_params": st.trainable, "fp8": st.fp8_summary, "skipped_samples": dict(skipped),
                              "mixture_counts": dict(mixed_counts), "seconds": round(time.time() - t_stage, 2),
                              "pid": os.getpid()}
    if rank == 0:
        _finish(st.core, st.tok, st.manifest, plan, seed, stage_dir, metrics, result, ctx)
    return result


def _finish(core: Any, tok: Any, manifest: Any, plan: StagePlan, seed: int, stage_dir: str, metrics: list,
            result: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Rank 0: held-out loss, ``final/``, ``metrics.json`` and ``loss.png``."""
    from training_hooks.efficient import merge_lora

    result["lora_merged"] = merge_lora(core)  # final/ is a plain NVILA directory
    core.eval()
    with torch.autocast(ctx["device"].type, dtype=torch.bfloat16, enabled=ctx["bf16"]):
        result["heldout_loss"] = heldout_losses(core, tok, manifest, plan, seed)
    final = os.path.join(stage_dir, "final")
    shutil.rmtree(final + ".tmp", ignore_errors=True)
    core.save_pretrained(final + ".tmp", tok)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(final + ".tmp", final)
    result["final"] = final
    result["metrics"] = metrics
    write_json_atomic(os.path.join(stage_dir, "metrics.json"), result)
    plot_losses({plan.name: metrics}, os.path.join(stage_dir, "loss.png"))


@torch.no_grad()
def heldout_losses(model: Any, tok: Any, manifest: Any, plan: StagePlan, seed: int) -> dict[str, float]:
    """Loss per data kind on the held-out slice of the stage's datasets (mean over label tokens)."""
    from training_hooks.evaluate import mean_token_loss

    builder = ExampleBuilder(model, tok, plan.max_length)
    by_kind: dict[str, list[Any]] = {}
    for src in stage_sources(manifest, plan.datasets, plan.heldout_every, plan.heldout_samples):
        exs = by_kind.setdefault(src.kind, [])
        n = 0
        for s in stream_samples(src, seed, DataSplit(), heldout=True, loop=False):
            ex = builder(s)
            if ex is not None:
                exs.append(ex)
                n += 1
            if n >= plan.heldout_samples:
                break
    losses = {k: mean_token_loss(model, v, tok.pad_token_id, plan.batch_size) for k, v in by_kind.items() if v}
    return {k: round(v, 5) for k, v in losses.items()}


def plot_losses(curves: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for name, m in curves.items():
        if not m:
            continue
        ax.plot([offset + x["step"] for x in m], [x["loss"] for x in m], label=name)
        offset += m[-1]["step"]
    ax.set_xlabel("step (stages in order)")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
