"""``curate train``: a manifest and a recipe in, NVILA checkpoints stage by stage out.

Everything is checked before the first step: the manifest verifies (its id matches its
content), its curated shards exist with the recorded sizes and checksums, the recipe names
real stages and modules, and each stage's first samples fit its sequence length.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from curation.data import storage
from curation.selection.manifest import Manifest, load_manifest
from training_hooks.checkpoint import write_json_atomic
from training_hooks.recipe import StagePlan, TrainRecipe, TrainRecipeError, load_train_recipe, plan_stages


class TrainingInputError(ValueError):
    pass


def verify_manifest_shards(m: Manifest, stages: list[StagePlan]) -> None:
    """Every shard a stage reads exists, with the size and md5 the manifest recorded."""
    from curation.data.shards import file_checksum

    needed = {ds for st in stages for ds in st.datasets}
    for ds in sorted(needed):
        for s in m.outputs[ds].shards:
            if not storage.exists(s.url):
                raise TrainingInputError(f"manifest {m.id}: shard {s.url} of {ds} is missing")
            size, checksum = file_checksum(s.url, algo="md5")  # md5 of a local file; the ETag on an object store
            if size != s.filesize:
                raise TrainingInputError(f"manifest {m.id}: shard {s.url} is {size} bytes, the manifest says {s.filesize}")
            if not storage.is_remote(s.url) and checksum != s.md5sum:
                raise TrainingInputError(f"manifest {m.id}: shard {s.url} has md5 {checksum}, "
                                         f"the manifest says {s.md5sum}")


def check_fits(m: Manifest, stages: list[StagePlan], init_dir: str, probe: int = 16) -> None:
    """Refuse a sequence length that no sample of a dataset can fit (checked on its first samples)."""
    from model import NVILAForCausalLM
    from model.nvila import load_tokenizer
    from model.examples import ExampleBuilder
    from training_hooks.data import DataSplit, stage_sources, stream_samples

    model = NVILAForCausalLM.from_pretrained(init_dir)
    tok = load_tokenizer(init_dir)
    for st in stages:
        for src in stage_sources(m, st.datasets):
            builder = ExampleBuilder(model, tok, max_length=10 ** 9)
            lengths = []
            for s in stream_samples(src, 0, DataSplit(), loop=False):
                ex = builder(s)
                if ex is not None:
                    lengths.append(ex.length)
                if len(lengths) >= probe:
                    break
            if lengths and min(lengths) > st.max_length:
                raise TrainingInputError(
                    f"stage {st.name}: max_length {st.max_length} cannot fit any sample of {src.name} "
                    f"(its first samples need {min(lengths)}-{max(lengths)} positions with their media)")


def check_gpu(recipe: TrainRecipe) -> None:
    """``use_gpu`` where this machine has no GPU: refused up front, not a CPU run (in-process) or
    a job waiting forever for GPUs (a local Ray cluster). A remote Ray cluster is not checked."""
    import torch

    remote = recipe.ray.enabled and (recipe.ray.address or os.environ.get("RAY_ADDRESS"))
    if recipe.ray.use_gpu and not torch.cuda.is_available() and not remote:
        raise TrainingInputError("ray.use_gpu is true but this machine has no CUDA GPU; set use_gpu: false to train "
                                 "on the CPU")


def describe_plan(m: Manifest, stages: list[StagePlan], skipped: list[str], recipe: TrainRecipe) -> str:
    lines = [f"training from manifest {m.id}; start: {recipe.init}; output: {recipe.output}",
             f"precision {recipe.precision}; FP8 {'on (' + recipe.fp8.recipe + ')' if recipe.fp8.enabled else 'off'}; "
             f"Ray Train {'on, ' + str(recipe.ray.num_workers) + ' worker(s)' if recipe.ray.enabled else 'off'}"]
    for st in stages:
        mix = ", ".join(f"{d} x{w:g}" for d, w in st.datasets.items())
        steps = f"{st.steps} steps" if st.steps else f"{st.epochs:g} epochs = {stage_steps(m, st, recipe.ray)} steps"
        lines.append(f"  {st.name:<16} trains {'+'.join(st.train):<30} lr {st.lr:g} (vision {st.vision_lr():g}), "
                     f"{steps}, batch {st.batch_size}, max_length {st.max_length}; data: {mix}")
    lines.extend(f"  {s}" for s in skipped)
    return "\n".join(lines)


def stage_steps(m: Manifest, st: StagePlan, ray: Any) -> int:
    """The optimizer steps a stage will run: its ``steps``, or its epochs over the manifest's counts."""
    from training_hooks.data import stage_sources, stage_total_steps

    sources = stage_sources(m, st.datasets, st.heldout_every, st.heldout_samples)
    return stage_total_steps(st, m, sources, ray.num_workers if ray.enabled else 1)


def _stage_config(manifest_path: str, recipe: TrainRecipe, st: StagePlan, init_dir: str) -> dict[str, Any]:
    return {"plan": st.model_dump(), "stage_dir": os.path.join(recipe.output, st.name), "init_dir": init_dir,
            "manifest": manifest_path if storage.is_remote(manifest_path) else os.path.abspath(manifest_path),
            "seed": recipe.seed, "precision": recipe.precision, "fp8": recipe.fp8.model_dump(), "prompts": recipe.prompts,
            "video_prompts": recipe.video_prompts, "use_gpu": recipe.ray.use_gpu,
            "threads": recipe.ray.cpus_per_worker if recipe.ray.enabled else None}


def _run_stages(manifest_path: str, recipe: TrainRecipe, stages: list[StagePlan],
                info: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every stage's result, in order: a stage already complete is read back; the others train,
    each from the previous stage's ``final/`` (a stage's ``final/`` is ``<output>/<stage>/final``),
    on Ray Train (one worker group for all of them) or in this process."""
    from training_hooks.trainer import run_stage

    done: dict[str, dict[str, Any]] = {}
    todo, prev = [], recipe.init
    for st in stages:
        stage_dir = os.path.join(recipe.output, st.name)
        if os.path.isfile(os.path.join(stage_dir, "metrics.json")) and os.path.isfile(os.path.join(stage_dir, "final", "config.json")):
            with open(os.path.join(stage_dir, "metrics.json")) as f:
                done[st.name] = json.load(f)
            info(f"stage {st.name}: already complete, {done[st.name]['steps']} steps (delete {stage_dir} to retrain)")
        else:
            todo.append(_stage_config(manifest_path, recipe, st, prev))
        prev = os.path.join(stage_dir, "final")

    def started(cfg: dict[str, Any]) -> None:
        info(f"stage {cfg['plan']['name']}: training from {cfg['init_dir']}")

    def finished(res: dict[str, Any]) -> None:
        info(f"stage {res['stage']}: {res['steps']} steps, loss {res['metrics'][0]['loss']:.3f} -> "
             f"{res['metrics'][-1]['loss']:.3f}, held-out {res['heldout_loss']}, skipped samples {res['skipped_samples']}")

    if todo and recipe.ray.enabled:
        from training_hooks.ray_train import run_stages_on_ray

        trained = run_stages_on_ray(todo, recipe.ray.num_workers, recipe.ray.use_gpu, recipe.ray.address,
                                    started=started, done=finished)
    else:
        trained = []
        for cfg in todo:
            started(cfg)
            trained.append(run_stage(cfg))
            finished(trained[-1])
    done.update({res["stage"]: res for res in trained})
    return [done[st.name] for st in stages]


def train_from_manifest(manifest_path: str, recipe_src: str | dict, *, info: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate, print the plan, run every stage in order (each from the previous one's final
    checkpoint), and write ``<output>/training_report.json`` naming the manifest id."""
    try:
        m = load_manifest(manifest_path)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingInputError(str(e)) from None
    recipe = load_train_recipe(recipe_src) if isinstance(recipe_src, str) else load_train_recipe(recipe_src)
    stages, skipped = plan_stages(recipe, m)
    if not stages:
        raise TrainingInputError("no stage to run: " + "; ".join(skipped))
    verify_manifest_shards(m, stages)
    check_gpu(recipe)
    check_fits(m, stages, recipe.init)
    info(describe_plan(m, stages, skipped, recipe))
    os.makedirs(recipe.output, exist_ok=True)
    from training_hooks.trainer import plot_losses

    t0 = time.time()
    results = _run_stages(manifest_path, recipe, stages, info)
    prev = results[-1]["final"]
    plot_losses({r["stage"]: r["metrics"] for r in results}, os.path.join(recipe.output, "loss.png"))
    report = {
        "manifest_id": m.id,
        "manifest": manifest_path,
        "init": recipe.init,
        "final_checkpoint": prev,
        "skipped_stages": skipped,
        "seconds": round(time.time() - t0, 1),
        "stages": [{k: v for k, v in r.items() if k != "metrics"} | {
            "first_loss": r["metrics"][0]["loss"], "last_loss": r["metrics"][-1]["loss"],
            "tokens_per_s": round(sum(x["tokens_per_s"] for x in r["metrics"]) / len(r["metrics"]), 1)} for r in results],
        "loss_plot": os.path.join(recipe.output, "loss.png"),
    }
    write_json_atomic(os.path.join(recipe.output, "training_report.json"), report)
    return report


__all__ = ["train_from_manifest", "TrainingInputError", "TrainRecipeError"]
