"""Prefect tasks: thin wrappers over the libraries, passing paths and small summaries only.

Ray work happens inside the tasks (``ray.init`` locally, or the cluster in ``RAY_ADDRESS``);
Prefect never ships samples. Tasks retry. Scoring, curation and training cache on the
*content* they read (``flows/caching.py``): a rerun over unchanged shards, recipe and policy
returns the cached summary, while a new or changed shard is always seen. The libraries below
are themselves resumable, so a retried or re-run task also skips what was already done (one
new shard: only that shard is scored). The demo's own steps (synthesis, filter and proxy
training) are not cached: their outputs live in the demo's folder, which a user may delete.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from curation.scoring.plan import ScoringPlan
from flows.caching import CACHE_TTL, ByContent, curate_key, fresh_unless, score_key, train_key, train_output_present


def _check_file(path: str, what: str) -> str:
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


@task(name="synthesize-corpus", retries=1)
def synthesize_task(out: str, size: str = "small", seed: int = 0, noise_scale: float = 1.0) -> dict[str, Any]:
    from curation.corpus.synth import SynthConfig, synthesize

    log = get_run_logger()
    result = synthesize(out, SynthConfig.preset(size, seed=seed, noise_scale=noise_scale), workers=min(2, os.cpu_count() or 1))
    summary = result.summary()
    log.info("synthesized %s", {k: v["samples"] for k, v in summary["datasets"].items()})
    return summary


@task(name="train-dfn-filter", retries=1)
def train_filter_task(trusted: str, out: str, steps: int = 150, seed: int = 0) -> dict[str, Any]:
    from curation.scoring.dfn import FilterTrainConfig, train_filter

    log = get_run_logger()
    r = train_filter(trusted, out, FilterTrainConfig(steps=steps, batch_size=64, warmup=10, seed=seed, shuffle_buffer=512),
                     progress=lambda s, loss: log.info("DFN step %d loss %.3f", s, loss) if s % 25 == 0 else None)
    return {"dir": out, "steps": r.steps, "final_loss": r.final_loss}


@task(name="train-deltaloss-proxies", retries=1)
def train_proxies_task(trusted: str, out: str, steps: int = 20, seed: int = 0) -> dict[str, Any]:
    from training_hooks.proxies import train_proxies

    log = get_run_logger()
    res = train_proxies(trusted, out, steps=steps, batch_size=8, seed=seed, info=log.info)
    return {k: v["dir"] for k, v in res.items()}


@task(name="score", retries=2, retry_delay_seconds=5, task_run_name="score-{scorer}",
      cache_policy=ByContent(content=score_key, exclude=["plan"]), cache_expiration=CACHE_TTL, persist_result=True)
def score_task(plan: ScoringPlan, scorer: str) -> dict[str, Any]:
    """One scorer of a resolved scoring plan over all its shards, on Ray."""
    log = get_run_logger()

    def progress(result, done, total):
        state = "skipped (done)" if result.skipped else ("FAILED: " + result.failed if result.failed else f"{result.rows} rows")
        log.info("[%s] %d/%d %s: %s", scorer, done, total, result.url, state)

    report = plan.run(scorer, progress)
    summary = report.summary()
    if report.failed:
        raise RuntimeError(f"{scorer}: {len(report.failed)} shard(s) failed: {summary['failed'][:3]}")
    return summary


@task(name="select-reshard-manifest", retries=1, 
      cache_policy=ByContent(content=curate_key), cache_expiration=CACHE_TTL, persist_result=True)
def curate_task(work: str, policy_path: str, out: str, max_samples: int = 1000, shuffle_seed: int | None = None,
                _scores: Any = None, allow_incomplete: bool = False) -> dict[str, Any]:
    """Selection, byte-exact resharding and the manifest (``_scores`` only orders it after scoring)."""
    from curation.selection.curate import curate
    from curation.selection.reshard import ReshardConfig

    log = get_run_logger()
    manifest, url = curate(work, _check_file(policy_path, "policy"), out,
                           ReshardConfig(max_samples=max_samples, shuffle_seed=shuffle_seed), allow_incomplete=allow_incomplete,
                           progress=lambda r, d, t: log.info("reshard %s group %d: %d samples%s", r.dataset, r.index,
                                                             r.copied, " (already done)" if r.skipped else ""))
    return {"manifest": url, "id": manifest.id, "decisions": manifest.decisions,
            "selection": {k: v.model_dump() for k, v in manifest.selection.items()},
            "outputs": {k: {"samples": v.samples, "shards": len(v.shards), "index": v.index} for k, v in manifest.outputs.items()}}


@task(name="select", retries=1)
def select_task(work: str, policy_path: str, allow_incomplete: bool = False) -> dict[str, Any]:
    from curation.selection.curate import select

    res = select(work, _check_file(policy_path, "policy"), allow_incomplete=allow_incomplete)
    return {"decisions": res.decisions_url, "counts": res.counts, "sql": res.sql}


@task(name="train-stages", retries=1, 
      cache_policy=ByContent(content=train_key), cache_expiration=CACHE_TTL, persist_result=True)
def train_task(manifest: str, recipe: str | dict) -> dict[str, Any]:
    from training_hooks.kickoff import train_from_manifest

    log = get_run_logger()
    if isinstance(recipe, str):
        _check_file(recipe, "training recipe")
    return train_from_manifest(manifest, recipe, info=log.info)


@task(name="evaluate-checkpoint", retries=1)
def evaluate_task(checkpoint: str, shards: str, out_dir: str, limit: int = 200) -> dict[str, Any]:
    """``curate eval``: held-out loss, caption accuracy against the ground truth, and the gallery."""
    from training_hooks.evaluate import evaluate_checkpoint, public

    log = get_run_logger()
    report = public(evaluate_checkpoint(_check_file(checkpoint, "checkpoint"), shards, out_dir=out_dir, limit=limit))
    log.info("caption accuracy %s on %d held-out images (per attribute %s); held-out loss %s",
             report["caption_accuracy"], report["images"], report["per_attribute"], report["heldout_loss"])
    return report


def scoring_plan(recipe_path: str) -> ScoringPlan:
    """The recipe resolved once for a whole flow run; a bad recipe fails the run here, before any work."""
    return ScoringPlan.resolve(_check_file(recipe_path, "scoring recipe"))


def run_score(plan: ScoringPlan, scorer: str) -> dict[str, Any]:
    """``score_task``, forced to run (and re-cache) when any score file it writes is missing."""
    return fresh_unless(score_task, plan.outputs_present(scorer))(plan, scorer)


def run_curate(work: str, policy_path: str, out: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``curate_task``, forced to run when ``out`` has no manifest."""
    from curation.data import storage

    present = storage.exists(storage.join(out, "manifest.json"))
    return fresh_unless(curate_task, present)(work, policy_path, out, *args, **kwargs)


def run_train(manifest: str, recipe: str | dict) -> dict[str, Any]:
    """``train_task``, forced to run when the recipe's output folder is missing."""
    return fresh_unless(train_task, train_output_present(recipe))(manifest, recipe)


# --------------------------------------------------------------------------- artifacts


def _png_markdown(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def selection_table(curated: dict[str, Any], key: str = "kept-and-dropped") -> None:
    rows = []
    for ds, sel in curated["selection"].items():
        rows.append({"dataset": ds, "kind": sel["kind"], "reason": "(kept)", "samples": sel["kept"]})
        for reason, n in sel["dropped"].items():
            rows.append({"dataset": ds, "kind": sel["kind"], "reason": reason, "samples": n})
    create_table_artifact(rows, key=key, description="Kept and dropped samples per dataset and reason")


def score_histograms(work: str) -> str:
    """Markdown with PNG histograms of the main score columns (embedded as data URIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curation.scoring.store import ScoreStore

    store = ScoreStore(work)
    cols = [c for c in ("clip_score", "delta_loss", "caption_words", "aspect_ratio") if c in store.columns()]
    if not cols:
        return ""
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3))
    axes = axes if len(cols) > 1 else [axes]
    for ax, c in zip(axes, cols):
        df = store.query_pl(f'SELECT dataset, "{c}" AS v FROM scores WHERE "{c}" IS NOT NULL')
        for ds in sorted(df["dataset"].unique().to_list()):
            ax.hist(df.filter(df["dataset"] == ds)["v"].to_numpy(), bins=30, alpha=0.5, label=ds)
        ax.set_title(c)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    md = _png_markdown(fig, "score histograms")
    plt.close(fig)
    return md


def curation_report(work: str, curated: dict[str, Any], key: str = "curation-report") -> str:
    lines = ["# Curation run", "", f"**Manifest** `{curated['id']}` at `{curated['manifest']}`", "",
             f"See what each rule dropped: `curate explore --work {work} --manifest {curated['manifest']}`", "",
             "| dataset | kind | scored | kept | dropped by (first rule) |", "|---|---|---|---|---|"]
    for ds, sel in curated["selection"].items():
        dropped = ", ".join(f"{k}={v}" for k, v in sel["dropped"].items()) or "-"
        lines.append(f"| {ds} | {sel['kind']} | {sel['scored']} | {sel['kept']} | {dropped} |")
    lines += ["", "## Score distributions", "", score_histograms(work)]
    md = "\n".join(lines)
    create_markdown_artifact(md, key=key, description="Curation report: manifest, selection, score histograms")
    return md


def training_report(report: dict[str, Any], key: str = "training-report") -> str:
    lines = [f"# Training from manifest `{report['manifest_id']}`", "", f"final checkpoint: `{report['final_checkpoint']}`", "",
             "| stage | steps | first loss | last loss | held-out loss | skipped samples |", "|---|---|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['steps']} | {s['first_loss']:.3f} | {s['last_loss']:.3f} | {s.get('heldout_loss')} "
                     f"| {s.get('skipped_samples')} |")
    if os.path.isfile(report.get("loss_plot", "")):
        with open(report["loss_plot"], "rb") as f:
            lines += ["", f"![loss curves](data:image/png;base64,{base64.b64encode(f.read()).decode()})"]
    lines += [f for f in report.get("skipped_stages", [])]
    md = "\n".join(lines)
    create_markdown_artifact(md, key=key, description="Training curves and held-out loss per stage")
    return md
