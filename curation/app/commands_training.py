"""``curate train``, ``eval``, ``init-model``, ``train-proxies``, ``demo``: train on a curated manifest."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer
from rich.table import Table

from curation.app.base import app, console, fail, out_console
from curation.app.commands_data import print_synth_summary


@app.command()
def train(
    manifest: str = typer.Option(..., "--manifest", "-m", help="Curated manifest.json: the only data input training needs"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Training recipe (YAML): init, output, stages, ..."),
) -> None:
    """Train NVILA stage by stage from a curated manifest (Ray Train or in-process)."""
    from training_hooks.kickoff import TrainingInputError, train_from_manifest
    from training_hooks.recipe import TrainRecipeError

    try:
        report = train_from_manifest(manifest, recipe, info=lambda t: out_console.print(t, markup=False, highlight=False))
    except (TrainingInputError, TrainRecipeError) as e:
        fail(str(e))
    out_console.print(f"trained on manifest {report['manifest_id']}; final checkpoint {report['final_checkpoint']}; "
                      f"report {os.path.join(os.path.dirname(report['loss_plot']), 'training_report.json')}")


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="NVILA directory (save_pretrained, a stage's final/)"),
    shards: list[str] = typer.Option(..., "--shards", help="Held-out shards (folders, patterns, URLs)"),
    ground_truth: Optional[str] = typer.Option(None, help="ground_truth.parquet of the synthetic corpus (default: "
                                                          "the one beside the shards' dataset folders, if any)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Gallery folder (default <checkpoint>/eval)"),
    limit: int = typer.Option(200, help="Evaluate the first N readable samples"),
    gallery: int = typer.Option(16, help="Images in the gallery"),
    batch_size: int = typer.Option(16),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Held-out loss and caption accuracy (greedy captions judged against the synthetic ground
    truth), with a gallery of images and their generated and true captions."""
    from training_hooks.evaluate import evaluate_checkpoint, public

    try:
        report = public(evaluate_checkpoint(checkpoint, shards, ground_truth=ground_truth, out_dir=out, limit=limit,
                                            gallery=gallery, batch_size=batch_size))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        out_console.print_json(json.dumps(report))
        return
    acc = report["caption_accuracy"]
    out_console.print(f"{report['samples']} samples from {report['shards']} shard(s); held-out loss "
                      f"{report['heldout_loss']}", markup=False, highlight=False)
    if acc is None:
        out_console.print("caption accuracy: n/a (no ground truth)")
    else:
        out_console.print(f"caption accuracy {acc:.1%} over {report['images']} clean images; per attribute "
                          f"{report['per_attribute']}; position stated in {report['position_stated']:.0%}",
                          markup=False, highlight=False)
    out_console.print(f"gallery: {report['gallery']['png']} and {report['gallery']['markdown']}", markup=False)


@app.command("init-model")
def init_model(
    manifest: str = typer.Option(..., "--manifest", "-m", help="Manifest whose curated text trains the tokenizer"),
    out: str = typer.Option(..., "--out", "-o", help="Where to save the NVILA directory"),
    size: str = typer.Option("tiny", help="tiny | demo (the demo's: a third vision layer) | small | nvila-lite-2b | "
                                          "nvila-8b (shaped like the released models, for GPU runs)"),
    seed: int = typer.Option(0),
) -> None:
    """Build a small NVILA (and a BPE tokenizer from the curated captions) to train from when
    no pretrained checkpoint is at hand."""
    from curation.selection.manifest import load_manifest
    from training_hooks.bootstrap import init_tiny_model

    from training_hooks.bootstrap import SIZES

    if size not in SIZES:
        fail(f"unknown size {size!r}: use {', '.join(SIZES)}")
    try:
        m = load_manifest(manifest)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    init_tiny_model(m, out, size=size, seed=seed)
    out_console.print(f"saved a {size} NVILA to {out}")


@app.command("pretrain-vision")
def pretrain_vision_cmd(
    model: str = typer.Option(..., "--model", help="NVILA directory (e.g. from init-model); updated in place"),
    pairs: list[str] = typer.Option(..., "--pairs", help="Clean image-text pair shards (folders, patterns, URLs)"),
    objective: str = typer.Option("words", help="words: predict the caption's tokens from the image (the tower "
                                  "alone, one tile per image); sigmoid: SigLIP's contrastive loss (tower and projector)"),
    steps: int = typer.Option(3000, min=1),
    batch_size: int = typer.Option(128, min=2),
    lr: float = typer.Option(2e-3),
    group: int = typer.Option(16, min=1, help="sigmoid: pairs per caption neighbourhood in a batch (hard negatives; "
                              "1: random batches)"),
    seed: int = typer.Option(0),
) -> None:
    """Pretrain the vision tower of an NVILA built from configs on image-text pairs, before the
    training stages: the stand-in for starting from a pretrained SigLIP. Writes
    vision_pretrain.json beside the weights."""
    from training_hooks.vision_pretrain import describe, pretrain_vision

    try:
        report = pretrain_vision(model, pairs, objective=objective, steps=steps, batch_size=batch_size, lr=lr,
                                 group=group, seed=seed, info=lambda t: console.print(t, markup=False, highlight=False))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    out_console.print(f"{model}: {describe(report).replace('**', '')}", markup=False, highlight=False)


@app.command("train-proxies")
def train_proxies_cmd(
    trusted: list[str] = typer.Option(..., "--trusted", help="Trusted seed shards (folders, patterns, URLs)"),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the models: <out>/small and <out>/large "
                            "(capability) or <out>/pool and <out>/reference (reference)"),
    pool: Optional[list[str]] = typer.Option(None, "--pool", help="The shards to be pruned (reference mode)"),
    mode: str = typer.Option("capability", "--mode", help="reference: a model trained on --pool minus one trained "
                             "on --trusted (RHO-LOSS); capability: a small and a large model on --trusted (NVILA)"),
    steps: int = typer.Option(60, help="Training steps per stage for the small proxy (and per round for the large)"),
    max_rounds: int = typer.Option(10, min=1, help="Most rounds the large proxy trains before early stopping"),
    batch_size: int = typer.Option(8),
    seed: int = typer.Option(0),
) -> None:
    """Train the DeltaLoss scorer's models: a pool and a reference model (reference mode), or a
    small and a large proxy on trusted data (capability mode); to convergence, with early
    stopping on a held-out slice."""
    from training_hooks.proxies import train_proxies

    try:
        res = train_proxies(trusted, out, steps=steps, batch_size=batch_size, seed=seed, max_rounds=max_rounds,
                            mode=mode, pool=pool,
                            info=lambda t: out_console.print(t, markup=False, highlight=False))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(str(e))
    for name, r in res.items():
        out_console.print(f"{name} proxy: {r['dir']}  " + ", ".join(f"{s}: {a:.3f}->{b:.3f}" for s, a, b in r["stages"]))


@app.command()
def demo(
    out: str = typer.Option("./curate-demo", "--out", "-o", help="Working folder for everything the demo writes"),
    size: str = typer.Option("small", help="Corpus size: tiny | small | medium | large | <number of pairs>"),
    seed: int = typer.Option(0),
    train: bool = typer.Option(True, help="Also train the tiny NVILA through its stages from the manifest"),
    ray_train: bool = typer.Option(True, help="Train on a Ray Train worker group (one per stage); "
                                   "--no-ray-train trains in this process: the same steps, without a worker group to start per stage"),
) -> None:
    """The whole service end to end on embedded defaults, as a Prefect flow (ephemeral server,
    local Ray): synthesize, train the DFN filter and DeltaLoss proxies, score, select, reshard,
    write the manifest, train NVILA stage by stage, and write a report with plots."""
    from curation.corpus.synth import SynthConfig

    try:
        SynthConfig.preset(size)
    except ValueError as e:
        fail(str(e))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from flows.demo import demo_flow, warm_up
    from flows.local_server import local_prefect

    # no Prefect server configured: the run gets its own database under --out (see flows/local_server.py),
    # migrated while the flow's Ray starts
    with local_prefect(os.path.join(out, ".prefect"), info=lambda m: console.print(m, markup=False),
                       meanwhile=warm_up) as where:
        console.print(f"Prefect runs recorded at {where}", markup=False, highlight=False)
        report = demo_flow(out=out, size=size, seed=seed, train=train, ray_train=ray_train)
    print_synth_summary(report["corpus"])
    t = Table(title="injected noise vs the curated selection (ground truth)")
    for col in ("dataset", "noise", "samples", "kept", "main reason"):
        t.add_column(col)
    for row in report["noise_caught"]:
        t.add_row(row["dataset"], row["noise"], str(row["samples"]), str(row["kept"]), str(row["main_reason"] or "-"))
    out_console.print(t)
    out_console.print(f"injected noise dropped: {report['noise_dropped_fraction']:.1%}, clean kept: "
                      f"{report['clean_kept_fraction']:.1%}; CLIP AUC {report['clip_auc_clean_vs_mismatched']}")
    out_console.print(f"manifest {report['manifest']['id']}: {report['manifest']['path']}")
    if report.get("training"):
        out_console.print("training: " + ", ".join(f"{s['stage']} {s['first_loss']:.2f}->{s['last_loss']:.2f}"
                                                   for s in report["training"]["stages"]))
    cur, unc = report.get("caption_eval") or {}, (report.get("uncurated") or {}).get("caption_eval") or {}
    if cur.get("caption_accuracy") is not None and unc.get("caption_accuracy") is not None:
        out_console.print(f"caption accuracy on held-out images: curated {cur['caption_accuracy']:.1%} "
                          f"(all attributes right {cur.get('all_right') or 0:.1%}), uncurated "
                          f"{unc['caption_accuracy']:.1%} (all right {unc.get('all_right') or 0:.1%}), same steps")
    tt = Table(title="time per phase")
    for col in ("phase", "wall s", "CPU s"):
        tt.add_column(col, justify="right" if col != "phase" else "left")
    for phase, t_ in report["timings"].items():
        tt.add_row(phase, f"{t_['wall_s']:.1f}", f"{t_['cpu_s']:.1f}")
    out_console.print(tt)
    out_console.print(f"report: {report['report']['html']} (and {report['report']['markdown']})")
