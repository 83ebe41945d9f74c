"""``curate score``, ``curate query``, ``curate train-filter``: score samples and look at the scores."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from curation.app.base import app, console, fail, fail_if_disk_full, out_console, progress_bar


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
        fail(str(e))
    console.print(f"scoring {len(plan.tasks)} shard(s) with {', '.join(plan.scorer_names)} -> {plan.work}")
    reports = []
    for names in plan.passes():  # scorers on one kind of device: one read and one decode per sample
        try:
            # stdout is for the report: Ray prints the cluster's errors (a lost node) to the driver's stdout
            with contextlib.redirect_stdout(sys.stderr):
                reports.extend(r.summary() for r in _run_pass(plan, names))
        except SourceConflictError as e:
            fail(str(e))
        except OSError as e:  # the store catalog or a score file on a full disk
            fail_if_disk_full(e)
            raise
    if as_json:
        out_console.print_json(json.dumps(reports))
    else:
        for r in reports:
            out_console.print(score_summary_line(r), markup=False, highlight=False)
    if any(r["failed"] for r in reports):
        raise typer.Exit(1)


def _run_pass(plan, names: list[str]) -> list:
    """One fused pass with a progress bar per scorer."""
    t0 = time.time()
    with progress_bar() as prog:
        bars = {n: prog.add_task(n, total=len(plan.tasks), rate="") for n in names}
        stats = {n: {"rows": 0, "errors": 0, "failed": 0, "skipped": 0} for n in names}

        def tick(result, done, total):
            st = stats[result.scorer]
            if result.skipped:
                st["skipped"] += 1
            elif result.failed:
                st["failed"] += 1
                console.print(f"[red]shard failed[/] ({escape(result.scorer)}) {escape(result.url)}: {escape(result.failed)}")
            else:
                st["rows"] += result.rows
                st["errors"] += result.errors
            rate = st["rows"] / max(1e-6, time.time() - t0)
            prog.update(bars[result.scorer], completed=done, rate=(
                f"{rate:.1f} samples/s, {st['errors']} sample errors, {st['skipped']} skipped, {st['failed']} failed"))

        return plan.run_pass(names, progress=tick)


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
        fail(f"no score files under {store.root}")
    try:
        df = store.query_pl(sql)
    except duckdb.Error as e:
        fail(f"query failed: {e}")
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
        fail("--eval needs --ground-truth to know which held-out samples are noise")
    cfg = FilterTrainConfig(model=model, steps=steps, max_minutes=minutes, batch_size=batch_size, lr=lr, seed=seed)
    t0 = time.time()
    try:
        with progress_bar() as prog:
            task = prog.add_task("training", total=steps, rate="")
            report = train_filter(trusted, out, cfg, progress=lambda s, loss: prog.update(
                task, completed=s, rate=f"loss {loss:.3f}, {s * batch_size / max(1e-6, time.time() - t0):.0f} samples/s"))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
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
