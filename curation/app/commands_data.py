"""``curate synth``, ``curate import-mmc4``, ``curate inspect``: make and look at shards."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import typer
from rich.markup import escape
from rich.table import Table

from curation.app.base import app, console, fail, out_console, progress_bar


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
        fail(str(e))
    total = sum(d.samples for d in cfg.datasets)
    t0 = time.time()
    with progress_bar() as prog:
        task = prog.add_task("synthesizing", total=total, rate="")

        def tick(dataset: str, n: int) -> None:
            done = prog.tasks[task].completed + n
            prog.update(task, advance=n, rate=f"{done / max(1e-6, time.time() - t0):.0f} samples/s", description=dataset)

        result = synthesize(out, cfg, workers=workers, progress=tick)
    summary = result.summary()
    if as_json:
        out_console.print_json(json.dumps(summary))
    else:
        print_synth_summary(summary)


def print_synth_summary(summary: dict) -> None:
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
        fail(str(e))
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
        fail(str(e))
    if not urls:
        fail(f"no shards found in {' '.join(shards)}")
    counts: dict[str, Counter] = defaultdict(Counter)
    errors: list[tuple[str, str, str]] = []
    t0 = time.time()
    n = 0
    with progress_bar() as prog:
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
