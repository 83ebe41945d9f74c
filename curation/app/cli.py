"""The ``curate`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Curate and prune vision-language training data: synthesize, read, score, select, reshard, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(code)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=False,
    )


@app.command()
def synth(
    out: str = typer.Option(..., "--out", "-o", help="Output folder or s3://bucket/prefix"),
    size: str = typer.Option("small", help="tiny | small | medium | large | <number of pairs>"),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical shards"),
    noise_scale: float = typer.Option(1.0, help="Multiply every default noise rate by this"),
    workers: int = typer.Option(1, help="Processes generating shards in parallel"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Write a synthetic corpus (pairs, MMC4 documents, videos) with known noise."""
    from curation.corpus.synth import SynthConfig, synthesize

    try:
        cfg = SynthConfig.preset(size, seed=seed, noise_scale=noise_scale)
    except ValueError as e:
        _fail(str(e))
    total = sum(d.samples for d in cfg.datasets)
    t0 = time.time()
    with _progress() as prog:
        task = prog.add_task("synthesizing", total=total, rate="")

        def tick(dataset: str, n: int) -> None:
            done = prog.tasks[task].completed + n
            prog.update(task, advance=n, rate=f"{done / max(1e-6, time.time() - t0):.0f} samples/s", description=dataset)

        result = synthesize(out, cfg, workers=workers, progress=tick)
    summary = result.summary()
    if as_json:
        out_console.print_json(json.dumps(summary))
    else:
        _print_synth_summary(summary)


def _print_synth_summary(summary: dict) -> None:
    t = Table(title=f"synthetic corpus in {summary['out']}")
    for col in ("dataset", "shards", "samples", "MB", "clean", "noise (injected)"):
        t.add_column(col)
    for name, d in summary["datasets"].items():
        noise = {k: v for k, v in sorted(d["noise"].items()) if k != "clean"}
        t.add_row(name, str(d["shards"]), str(d["samples"]), f"{d['bytes'] / 1e6:.1f}", str(d["noise"].get("clean", 0)),
                  ", ".join(f"{k}={v}" for k, v in noise.items()))
    out_console.print(t)
    out_console.print(f"ground truth: {summary['ground_truth']}")


@app.command("import-mmc4")
def import_mmc4_cmd(
    jsonl: list[str] = typer.Argument(..., help="MMC4 document files (.jsonl, .jsonl.gz or .zip)"),
    images: str = typer.Option(..., help="Folder holding the documents' images (searched recursively by image_name)"),
    out: str = typer.Option(..., "--out", "-o", help="Output folder or s3:// prefix for the shards"),
    samples_per_shard: int = typer.Option(1000, help="Documents per shard"),
    max_shard_bytes: int = typer.Option(1 << 30, help="Bytes per shard before starting a new one"),
) -> None:
    """Convert MMC4 jsonl documents + an image folder into WebDataset shards."""
    from curation.corpus.mmc4 import import_mmc4

    try:
        report = import_mmc4(jsonl, images, out, samples_per_shard=samples_per_shard, max_bytes=max_shard_bytes)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    out_console.print(
        f"read {report.documents} documents: wrote {report.written} in {len(report.shards)} shard(s) to {out}, "
        f"{report.images} images, {report.missing_images} missing images, {len(report.bad_lines)} bad lines"
    )
    for line in report.bad_lines[:20]:
        console.print(f"[yellow]skipped[/] {line}")
    if len(report.bad_lines) > 20:
        console.print(f"... and {len(report.bad_lines) - 20} more (see import_report.json)")


@app.command()
def inspect(
    shards: list[str] = typer.Argument(..., help="Shard URLs, folders, brace patterns or globs (local or s3://)"),
    kind: str = typer.Option("auto", help="pair | interleaved | video | auto"),
    show_errors: int = typer.Option(10, help="How many unreadable samples to list"),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON"),
) -> None:
    """Read shards and report samples, kinds and unreadable samples per dataset."""
    from curation.data.shards import ShardError, list_shards, read_shard

    try:
        urls = list_shards(shards)
    except FileNotFoundError as e:
        _fail(str(e))
    if not urls:
        _fail(f"no shards found in {' '.join(shards)}")
    counts: dict[str, Counter] = defaultdict(Counter)
    errors: list[tuple[str, str, str]] = []
    t0 = time.time()
    n = 0
    with _progress() as prog:
        task = prog.add_task("reading", total=len(urls), rate="")
        for url in urls:
            try:  # samples read before a shard fails stay counted
                for s in read_shard(url, kind=kind):
                    n += 1
                    counts[s.dataset][s.kind] += 1
                    counts[s.dataset]["samples"] += 1
                    if s.error:
                        counts[s.dataset]["errors"] += 1
                        errors.append((s.dataset, f"{s.shard}/{s.key}", s.error))
            except ShardError as e:
                counts["<unreadable shards>"]["shards"] += 1
                errors.append(("-", url, str(e)))
            except Exception as e:  # noqa: BLE001 - one shard's failure (I/O, ...) must not hide the others' counts
                counts["<unreadable shards>"]["shards"] += 1
                errors.append(("-", url, f"cannot read shard: {type(e).__name__}: {e}"))
            prog.update(task, advance=1, rate=f"{n / max(1e-6, time.time() - t0):.0f} samples/s")
    if as_json:
        out_console.print_json(json.dumps({"shards": len(urls), "datasets": {k: dict(v) for k, v in counts.items()},
                                           "errors": [list(e) for e in errors]}))
        return
    t = Table(title=f"{len(urls)} shard(s)")
    for col in ("dataset", "samples", "pair", "interleaved", "video", "errors"):
        t.add_column(col)
    for ds, c in sorted(counts.items()):
        t.add_row(ds, *(str(c.get(k, 0)) for k in ("samples", "pair", "interleaved", "video", "errors")))
    out_console.print(t)
    for ds, where, err in errors[:show_errors]:
        out_console.print(f"[yellow]{escape(ds)} {escape(where)}[/]: {escape(err)}")
    if len(errors) > show_errors:
        out_console.print(f"... and {len(errors) - show_errors} more unreadable samples")


@app.command()
def score(
    config: str = typer.Option(..., "--config", "-c", help="Scoring recipe (YAML): work, sources, scorers, ray"),
    only: Optional[list[str]] = typer.Option(None, "--scorer", help="Run only these scorers of the recipe"),
    as_json: bool = typer.Option(False, "--json", help="Print the run reports as JSON"),
) -> None:
    """Score every sample of the recipe's shards with its scorers (Ray, resumable)."""
    from curation.scoring.engine import SourceConflictError
    from curation.scoring.plan import ScoringPlan
    from curation.scoring.recipe import RecipeError

    try:
        plan = ScoringPlan.resolve(config)
        if only:
            plan = plan.only([n for n in plan.scorer_names if n in only] + sorted(set(only) - set(plan.scorer_names)))
    except RecipeError as e:
        _fail(str(e))
    console.print(f"scoring {len(plan.tasks)} shard(s) with {', '.join(plan.scorer_names)} -> {plan.work}")
    reports = []
    for spec in plan.specs:
        t0 = time.time()
        with _progress() as prog:
            task = prog.add_task(spec.name, total=len(plan.tasks), rate="")
            stats = {"rows": 0, "errors": 0, "failed": 0, "skipped": 0}

            def tick(result, done, total, prog=prog, task=task, stats=stats, t0=t0):
                if result.skipped:
                    stats["skipped"] += 1
                elif result.failed:
                    stats["failed"] += 1
                    console.print(f"[red]shard failed[/] {escape(result.url)}: {escape(result.failed)}")
                else:
                    stats["rows"] += result.rows
                    stats["errors"] += result.errors
                rate = stats["rows"] / max(1e-6, time.time() - t0)
                prog.update(task, completed=done, rate=(
                    f"{rate:.1f} samples/s, {stats['errors']} sample errors, {stats['skipped']} skipped, "
                    f"{stats['failed']} failed"))

            try:
                report = plan.run(spec.name, progress=tick)
            except SourceConflictError as e:
                _fail(str(e))
        reports.append(report.summary())
    if as_json:
        out_console.print_json(json.dumps(reports))
    else:
        for r in reports:
            out_console.print(score_summary_line(r), markup=False, highlight=False)
    if any(r["failed"] for r in reports):
        raise typer.Exit(1)


def score_summary_line(r: dict) -> str:
    """One scorer's run in a line (plain text: ``[<config hash>]`` is not Rich markup)."""
    return (f"{r['scorer']} [{r['config_hash']}]: {r['scored']} scored, {r['skipped']} already done, "
            f"{len(r['failed'])} failed, {r['rows']} rows ({r['sample_errors']} with errors) in {r['seconds']} s")


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL over the views: one per scorer (basic, clip, ...) and `scores` (joined)"),
    work: str = typer.Option("./work", help="Score store root (local folder or s3://)"),
    csv: Optional[str] = typer.Option(None, help="Write the result to this CSV file"),
    parquet: Optional[str] = typer.Option(None, help="Write the result to this Parquet file"),
    limit: int = typer.Option(50, help="Rows to print (files get every row)"),
) -> None:
    """Query sample scores with SQL (DuckDB)."""
    import duckdb

    from curation.scoring.store import ScoreStore

    store = ScoreStore(work)
    if not store.views:
        _fail(f"no score files under {store.root}")
    try:
        df = store.query_pl(sql)
    except duckdb.Error as e:
        _fail(f"query failed: {e}")
    if csv:
        df.write_csv(csv)
        console.print(f"wrote {df.height} rows to {csv}")
    if parquet:
        df.write_parquet(parquet)
        console.print(f"wrote {df.height} rows to {parquet}")
    if not csv and not parquet:
        t = Table(show_lines=False)
        for c in df.columns:
            t.add_column(c)
        for row in df.head(limit).iter_rows():
            t.add_row(*("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row))
        out_console.print(t)
        if df.height > limit:
            out_console.print(f"... {df.height - limit} more rows (use --limit, --csv or --parquet)")


@app.command("train-filter")
def train_filter_cmd(
    trusted: list[str] = typer.Option(..., "--trusted", help="Trusted pair shards (folders, patterns, URLs)"),
    out: str = typer.Option(..., "--out", "-o", help="Folder to save the OpenCLIP filter model in"),
    model: str = typer.Option("tiny-clip", help="open_clip model config name (e.g. tiny-clip, small-clip, ViT-B-32)"),
    steps: int = typer.Option(600, help="Training steps"),
    minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes"),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    eval_shards: Optional[list[str]] = typer.Option(None, "--eval", help="Held-out pair shards to report ROC AUC on"),
    ground_truth: Optional[str] = typer.Option(None, help="ground_truth.parquet labelling the held-out shards"),
) -> None:
    """Train a DFN-style CLIP filter on trusted pairs; save it for the clip scorer."""
    from curation.scoring.dfn import FilterTrainConfig, evaluate_filter, train_filter

    if eval_shards and not ground_truth:
        _fail("--eval needs --ground-truth to know which held-out samples are noise")
    cfg = FilterTrainConfig(model=model, steps=steps, max_minutes=minutes, batch_size=batch_size, lr=lr, seed=seed)
    t0 = time.time()
    try:
        with _progress() as prog:
            task = prog.add_task("training", total=steps, rate="")
            report = train_filter(trusted, out, cfg, progress=lambda s, loss: prog.update(
                task, completed=s, rate=f"loss {loss:.3f}, {s * batch_size / max(1e-6, time.time() - t0):.0f} samples/s"))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    out_console.print(f"trained {report.steps} steps in {report.seconds} s, final loss {report.final_loss:.3f}; saved to {out}")
    if eval_shards:
        import polars as pl

        gt = pl.read_parquet(ground_truth)
        ev = evaluate_filter(out, eval_shards, gt)
        report.eval = ev
        with open(os.path.join(out, "train_report.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        out_console.print(f"held-out ROC AUC (clean vs mismatched captions): {ev['roc_auc']:.3f} "
                          f"on {ev['clean']} clean / {ev['negatives']} mismatched")


def _print_selection(counts: dict) -> None:
    t = Table(title="selection")
    for col in ("dataset", "kind", "scored", "kept", "dropped", "dropped by (first rule)"):
        t.add_column(col)
    for ds, c in counts.items():
        dropped = sum(c["dropped"].values())
        t.add_row(ds, c["kind"], str(c["scored"]), str(c["kept"]), str(dropped),
                  ", ".join(f"{k}={v}" for k, v in c["dropped"].items()) or "-")
    out_console.print(t)


@app.command()
def select(
    policy: str = typer.Option(..., "--policy", "-p", help="Selection policy (YAML)"),
    work: str = typer.Option("./work", help="Score store root (local folder or s3://)"),
    explain: bool = typer.Option(False, "--explain", help="Print the DuckDB SQL the policy compiles to, and stop"),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON"),
) -> None:
    """Apply a selection policy to the scores: kept keys and a reason for every dropped sample."""
    from curation.selection.policy import PolicyError, load_policy, run_selection
    from curation.selection.policy_sql import compile_policy
    from curation.scoring.store import ScoreStore

    try:
        pol = load_policy(policy)
        store = ScoreStore(work)
        if not store.views:
            _fail(f"no score files under {store.root}; run `curate score` first")
        if explain:
            datasets = [r[0] for r in store.con.execute("SELECT DISTINCT dataset FROM scores ORDER BY 1").fetchall()]
            out_console.print(compile_policy(pol, datasets, store.columns()).sql, markup=False, highlight=False)
            return
        result = run_selection(store, pol)
    except PolicyError as e:
        _fail(str(e))
    if as_json:
        out_console.print_json(json.dumps({"decisions": result.decisions_url, "counts": result.counts}))
        return
    _print_selection(result.counts)
    out_console.print(f"decisions (every scored sample, dropped_by NULL when kept): {result.decisions_url}")


@app.command()
def reshard(
    policy: str = typer.Option(..., "--policy", "-p", help="Selection policy (YAML), with its stage plan"),
    out: str = typer.Option(..., "--out", "-o", help="Where curated shards and manifest.json go (folder or s3://)"),
    work: str = typer.Option("./work", help="Score store root"),
    max_samples: int = typer.Option(1000, help="Samples per output shard"),
    max_bytes: int = typer.Option(1 << 30, help="Bytes per output shard"),
    shuffle_seed: Optional[int] = typer.Option(None, help="Shuffle deterministically with this seed"),
    workers: int = typer.Option(2, help="Parallel Ray tasks (1: in this process, without Ray)"),
) -> None:
    """Select, copy kept samples byte for byte into new shards, and write the manifest."""
    from curation.selection.curate import curate
    from curation.selection.manifest import summarize
    from curation.selection.policy import PolicyError
    from curation.selection.reshard import ReshardConfig, ReshardError
    from curation.data.outlock import OutputLockedError

    try:
        cfg = ReshardConfig(max_samples=max_samples, max_bytes=max_bytes, shuffle_seed=shuffle_seed, workers=workers)
    except ValueError as e:
        _fail(str(e))
    with _progress() as prog:
        task = prog.add_task("resharding", total=None, rate="")

        def tick(r, done, total):
            prog.update(task, total=total, completed=done, rate=f"{r.dataset} group {r.index}: {r.copied} samples"
                        + (f", {len(r.refused)} refused" if r.refused else "") + (" (already done)" if r.skipped else ""))

        try:
            manifest, url = curate(work, policy, out, cfg, progress=tick, use_ray=workers > 1)
        except (PolicyError, ReshardError, OutputLockedError, ValueError) as e:
            _fail(str(e))
    out_console.print(summarize(manifest), markup=False, highlight=False)
    out_console.print(f"manifest: {url}")


manifest_app = typer.Typer(help="Inspect curated manifests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("show")
def manifest_show(
    path: str = typer.Argument(..., help="manifest.json (local or s3://)"),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest"),
    show_lineage: bool = typer.Option(False, "--lineage", help="List the manifests this one replaced, newest first"),
) -> None:
    """Summarize a manifest: inputs, scorers, kept/dropped per dataset and reason, stages."""
    from curation.selection.manifest import lineage, load_manifest, summarize

    try:
        m = load_manifest(path)
        chain = lineage(path) if show_lineage else []
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if show_lineage:
        rows = [{"id": x.id, "created_at": x.created_at, "parent": x.parent,
                 "kept": {ds: sel.kept for ds, sel in x.selection.items()}} for x in chain]
        if as_json:
            out_console.print(json.dumps(rows, indent=2), markup=False, highlight=False)
        else:
            for r in rows:
                kept = ", ".join(f"{ds}={n}" for ds, n in r["kept"].items())
                out_console.print(f"{r['id']}  {r['created_at']}  kept {kept}", markup=False, highlight=False)
    elif as_json:
        out_console.print(m.to_json(), markup=False, highlight=False)
    else:
        out_console.print(summarize(m), markup=False, highlight=False)


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
        _fail(str(e))
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
        _fail(str(e))
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
    size: str = typer.Option("tiny", help="tiny | small"),
    seed: int = typer.Option(0),
) -> None:
    """Build a small NVILA (and a BPE tokenizer from the curated captions) to train from when
    no pretrained checkpoint is at hand."""
    from curation.selection.manifest import load_manifest
    from training_hooks.bootstrap import init_tiny_model

    if size not in ("tiny", "small"):
        _fail(f"unknown size {size!r}: use tiny or small")
    try:
        m = load_manifest(manifest)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    init_tiny_model(m, out, size=size, seed=seed)
    out_console.print(f"saved a {size} NVILA to {out}")


@app.command("train-proxies")
def train_proxies_cmd(
    trusted: list[str] = typer.Option(..., "--trusted", help="Trusted seed shards (folders, patterns, URLs)"),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the proxies: <out>/small and <out>/large"),
    steps: int = typer.Option(60, help="Training steps per stage for the small proxy (and per round for the large)"),
    max_rounds: int = typer.Option(10, min=1, help="Most rounds the large proxy trains before early stopping"),
    batch_size: int = typer.Option(8),
    seed: int = typer.Option(0),
) -> None:
    """Train a small and a large NVILA proxy on trusted data, for the DeltaLoss scorer (the large
    one to convergence: early stopping on the trusted data's held-out slice)."""
    from training_hooks.proxies import train_proxies

    try:
        res = train_proxies(trusted, out, steps=steps, batch_size=batch_size, seed=seed, max_rounds=max_rounds,
                            info=lambda t: out_console.print(t, markup=False, highlight=False))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    for name, r in res.items():
        out_console.print(f"{name} proxy: {r['dir']}  " + ", ".join(f"{s}: {a:.3f}->{b:.3f}" for s, a, b in r["stages"]))


@app.command()
def demo(
    out: str = typer.Option("./curate-demo", "--out", "-o", help="Working folder for everything the demo writes"),
    size: str = typer.Option("small", help="Corpus size: tiny | small | medium | large | <number of pairs>"),
    seed: int = typer.Option(0),
    train: bool = typer.Option(True, help="Also train the tiny NVILA through its stages from the manifest"),
) -> None:
    """The whole service end to end on embedded defaults, as a Prefect flow (ephemeral server,
    local Ray): synthesize, train the DFN filter and DeltaLoss proxies, score, select, reshard,
    write the manifest, train NVILA stage by stage, and write a report with plots."""
    from curation.corpus.synth import SynthConfig

    try:
        SynthConfig.preset(size)
    except ValueError as e:
        _fail(str(e))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from flows.demo import demo_flow
    from flows.local_server import local_prefect

    # no Prefect server configured: the run gets its own database under --out (see flows/local_server.py)
    with local_prefect(os.path.join(out, ".prefect"), info=lambda m: console.print(m, markup=False)) as where:
        console.print(f"Prefect runs recorded at {where}", markup=False, highlight=False)
        report = demo_flow(out=out, size=size, seed=seed, train=train)
    _print_synth_summary(report["corpus"])
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
    out_console.print(f"timings (s): {report['timings_s']}")
    out_console.print(f"report: {report['report']['html']} (and {report['report']['markdown']})")


def main() -> None:  # pragma: no cover - console entry for `python -m curation.app.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
