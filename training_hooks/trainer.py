"""One NVILA training stage: the loop, its checkpoints, its metrics; run on Ray Train or in-process.

Each stage loads the previous stage's final directory (or the recipe's ``init``), freezes what
the stage does not train, optionally converts the trainable linears to FP8, and trains with
AdamW (vision tower at a lower LR where the LLM also trains), linear warmup then cosine decay,
and gradient clipping. Every ``save_every`` steps it writes ``checkpoints/step-N`` (weights,
optimizer, scheduler, position in the data stream); a killed stage resumes from the last one
and continues the same loss curve. At the end it writes ``final/`` (an NVILA directory the next
stage starts from), ``metrics.json`` (loss, LR, tokens/s per step; held-out loss per data kind)
and ``loss.png``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from typing import Any

import torch

from curation.prefetch import prefetch
from model.examples import ExampleBuilder
from training_hooks.data import DataSplit, batches, example_stream, stage_sources, stream_samples
from training_hooks.recipe import StagePlan


class StageInterrupted(RuntimeError):
    """Raised by the ``_stop_after`` test hook to simulate a kill right after a checkpoint."""


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


def _latest_checkpoint(stage_dir: str) -> str | None:
    d = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(d):
        return None
    done = [x for x in os.listdir(d) if x.startswith("step-") and os.path.isfile(os.path.join(d, x, "state.pt"))]
    if not done:
        return None
    return os.path.join(d, max(done, key=lambda x: int(x.split("-")[1])))


def _save_checkpoint(stage_dir: str, step: int, model: Any, opt: Any, sched: Any, state: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    d = os.path.join(stage_dir, "checkpoints", f"step-{step:06d}")
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **state}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)  # a checkpoint directory exists only once complete
    # keep the last two
    root = os.path.join(stage_dir, "checkpoints")
    olds = sorted(x for x in os.listdir(root) if x.startswith("step-") and not x.endswith(".tmp"))
    for x in olds[:-2]:
        shutil.rmtree(os.path.join(root, x), ignore_errors=True)


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def run_stage(config: dict[str, Any], rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """The training loop of one stage (what every Ray Train worker runs)."""
    from curation.manifest import load_manifest
    from model import NVILAForCausalLM
    from model.nvila import load_tokenizer

    plan = StagePlan(**config["plan"])
    stage_dir, init_dir = config["stage_dir"], config["init_dir"]
    os.makedirs(stage_dir, exist_ok=True)
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    manifest = load_manifest(config["manifest"])
    model = NVILAForCausalLM.from_pretrained(init_dir)
    tok = load_tokenizer(init_dir)
    trainable = freeze_for(model, plan.train)
    fp8 = config.get("fp8") or {}
    fp8_summary = None
    if fp8.get("enabled"):
        from model.fp8 import convert_to_fp8

        fp8_summary = convert_to_fp8(model, fp8.get("recipe", "tensorwise"), emulate=fp8.get("emulate"))
    vision_params = [p for p in model.vision_tower.parameters() if p.requires_grad]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("vision_tower.")]
    groups = [g for g in ({"params": other, "lr": plan.lr}, {"params": vision_params, "lr": plan.vision_lr()}) if g["params"]]
    if fp8.get("optimizer_states"):
        from model.fp8 import fp8_optimizer

        opt = fp8_optimizer(groups, lr=plan.lr, weight_decay=plan.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=plan.lr, weight_decay=plan.weight_decay)
    sources = stage_sources(manifest, plan.datasets, plan.heldout_every, plan.heldout_samples)
    total_steps = plan.steps or max(1, math.ceil(plan.epochs * sum(manifest.outputs[s.name].samples for s in sources)
                                                 / (plan.batch_size * world_size)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(plan.warmup_steps, total_steps - 1), total_steps))

    start_step, consumed, metrics = 0, 0, []
    ckpt = _latest_checkpoint(stage_dir)
    if ckpt:
        from safetensors.torch import load_model

        load_model(model, os.path.join(ckpt, "model.safetensors"))
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step, consumed, metrics = state["step"], state["consumed"], state["metrics"]
    if world_size > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, parallel_strategy=config.get("strategy", "ddp"))
    core = _unwrap(model)

    skipped: Counter = Counter()
    builder = ExampleBuilder(core, tok, plan.max_length, config.get("prompts") or ("Describe the image.",),
                             config.get("video_prompts") or ("Describe the video.",), skipped)
    mixed_counts: Counter = Counter()
    split = DataSplit(rank, world_size)
    examples = example_stream(sources, builder, seed, split, mixed_counts)
    for _ in range(consumed):  # resume: the same stream, past what was already trained on
        next(examples)
    stream = prefetch(batches(examples, plan.batch_size, tok.pad_token_id, plan.max_length))

    bf16 = config.get("precision") == "bf16"
    device_type = "cuda" if torch.cuda.is_available() and config.get("use_gpu") else "cpu"
    model.train()
    stop_after = config.get("_stop_after")
    t_stage = time.time()
    for step in range(start_step, total_steps):
        t0 = time.time()
        batch = next(stream)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], plan.grad_clip)
        opt.step()
        sched.step()
        consumed += plan.batch_size
        dt = time.time() - t0
        tokens = int(batch["attention_mask"].sum())
        metrics.append({"step": step + 1, "loss": round(loss.item(), 5), "lr": opt.param_groups[0]["lr"],
                        "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tokens / dt, 1),
                        "samples_per_s": round(plan.batch_size / dt, 2)})
        last = step + 1 == total_steps
        if rank == 0 and ((step + 1) % plan.save_every == 0 or last):
            _save_checkpoint(stage_dir, step + 1, core, opt, sched,
                             {"step": step + 1, "consumed": consumed, "metrics": metrics})
        if stop_after is not None and step + 1 >= stop_after and not last:
            stream.close()
            raise StageInterrupted(f"stage {plan.name} stopped after step {step + 1} (test hook)")
    stream.close()
    seconds = time.time() - t_stage
    result: dict[str, Any] = {"stage": plan.name, "steps": total_steps, "resumed_from": start_step,
                              "trainable_params": trainable, "fp8": fp8_summary, "skipped_samples": dict(skipped),
                              "mixture_counts": dict(mixed_counts), "seconds": round(seconds, 2)}
    if rank == 0:
        model.eval()
        result["heldout_loss"] = heldout_losses(core, tok, manifest, plan, seed)
        final = os.path.join(stage_dir, "final")
        core.save_pretrained(final + ".tmp", tok)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(final + ".tmp", final)
        result["final"] = final
        result["metrics"] = metrics
        with open(os.path.join(stage_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot_losses({plan.name: metrics}, os.path.join(stage_dir, "loss.png"))
    return result


@torch.no_grad()
def heldout_losses(model: Any, tok: Any, manifest: Any, plan: StagePlan, seed: int) -> dict[str, float]:
    """Mean loss per data kind on the held-out slice of the stage's datasets."""
    from model.conversation import collate

    builder = ExampleBuilder(model, tok, plan.max_length)
    losses: dict[str, list[float]] = {}
    for src in stage_sources(manifest, plan.datasets, plan.heldout_every, plan.heldout_samples):
        n = 0
        exs = []
        for s in stream_samples(src, seed, DataSplit(), heldout=True, loop=False):
            ex = builder(s)
            if ex is not None:
                exs.append(ex)
                n += 1
            if n >= plan.heldout_samples:
                break
        for i in range(0, len(exs), plan.batch_size):
            out = model(**collate(exs[i: i + plan.batch_size], tok.pad_token_id))
            losses.setdefault(src.kind, []).append(out.loss.item())
    return {k: round(sum(v) / len(v), 5) for k, v in losses.items()}


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


def _ray_train_loop(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    result = run_stage(config, ctx.get_world_rank(), ctx.get_world_size())
    ray.train.report({"stage": result["stage"], "steps": result["steps"]})


def run_stage_on_ray(config: dict[str, Any], num_workers: int = 1, use_gpu: bool = False) -> dict[str, Any]:
    """Run one stage with Ray Train's TorchTrainer (DDP/FSDP when several workers)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from curation.engine import ensure_ray

    ensure_ray()
    cfg = dict(config, use_gpu=use_gpu, threads=config.get("threads") or 1)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg["threads"]}),
        run_config=RunConfig(name=f"nvila-{config['plan']['name']}",
                             storage_path=os.path.abspath(os.path.join(config["stage_dir"], "ray_results"))),
    )
    trainer.fit()
    with open(os.path.join(config["stage_dir"], "metrics.json")) as f:
        return json.load(f)
