"""``curate select``, ``curate reshard``, ``curate manifest show``: choose samples, write the curated shards."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from curation.app.base import app, fail, fail_if_disk_full, out_console, progress_bar


ALLOW_INCOMPLETE = ("Go on when a scorer the policy reads has no score file for some shards: their samples are "
                    "dropped as not_scored:<scorer> (default: refuse, naming them)")
MEMORY_LIMIT = "DuckDB memory limit for selection, e.g. 2GB (default: the policy's run.memory_limit, else 1/4 of RAM, <= 4 GB)"
TEMP_DIR = "Where selection spills past its memory limit (default: the policy's run.temp_directory, else the system's)"


def _resources(pol, memory_limit: Optional[str], temp_dir: Optional[str]):
    """The policy's run: options, with the command line's on top."""
    from curation.selection.runner import Resources

    base = pol.run.model_dump() if pol.run else {}
    return Resources(**{**base, **{k: v for k, v in (("memory_limit", memory_limit), ("temp_directory", temp_dir)) if v}})


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
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help=ALLOW_INCOMPLETE),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_LIMIT),
    temp_dir: Optional[str] = typer.Option(None, "--temp-dir", help=TEMP_DIR),
) -> None:
    """Apply a selection policy to the scores: kept keys and a reason for every dropped sample."""
    from curation.selection.policy import PolicyError, load_policy, run_selection
    from curation.selection.policy_sql import compile_policy
    from curation.scoring.store import ScoreStore

    try:
        pol = load_policy(policy)
        store = ScoreStore(work)
        if not store.views:
            fail(f"no score files under {store.root}; run `curate score` first")
        if explain:
            out_console.print(compile_policy(pol, store.datasets(), store.columns(), store.rows()).sql,
                              markup=False, highlight=False)
            return
        result = run_selection(store, pol, allow_incomplete=allow_incomplete,
                               resources=_resources(pol, memory_limit, temp_dir))
    except PolicyError as e:
        fail(str(e))
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
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help=ALLOW_INCOMPLETE),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_LIMIT),
    temp_dir: Optional[str] = typer.Option(None, "--temp-dir", help=TEMP_DIR),
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
        fail(str(e))
    with progress_bar() as prog:
        task = prog.add_task("resharding", total=None, rate="")

        def tick(r, done, total):
            prog.update(task, total=total, completed=done, rate=f"{r.dataset} group {r.index}: {r.copied} samples"
                        + (f", {len(r.refused)} refused" if r.refused else "") + (" (already done)" if r.skipped else ""))

        try:
            resources = None
            if memory_limit or temp_dir:
                from curation.selection.policy import load_policy

                resources = _resources(load_policy(policy), memory_limit, temp_dir)
            manifest, url = curate(work, policy, out, cfg, progress=tick, use_ray=workers > 1,
                                   allow_incomplete=allow_incomplete, resources=resources)
        except (PolicyError, ReshardError, OutputLockedError, ValueError) as e:
            fail(str(e))
        except OSError as e:  # shards, their records or the manifest on a full disk
            fail_if_disk_full(e)
            raise
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
        fail(str(e))
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
