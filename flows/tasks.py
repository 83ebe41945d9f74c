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
    """The DFN filter, trained in a child process on one torch thread (``flows.child``), so the
    flow can train the DeltaLoss proxies beside it (``train_filter_task.submit``)."""
    from flows.child import Child

    log = get_run_logger()
    return Child("flows.demo_parts:train_filter", threads=1, trusted=trusted, out=out, steps=steps, seed=seed).result(log.info)


@task(name="train-deltaloss-proxies", retries=1)
def train_proxies_task(trusted: str, out: str, steps: int = 20, seed: int = 0) -> dict[str, Any]:
    from training_hooks.proxies import train_proxies

    log = get_run_logger()
    res = train_proxies(trusted, out, steps=steps, batch_size=8, seed=seed, info=log.info)
    return {k: v["dir"] for k, v in res.items()}


def _names(scorers: str | list[str]) -> list[str]:
    return [scorers] if isinstance(scorers, str) else list(scorers)


def _pass_run_name(parameters: dict[str, Any]) -> str:
    """``score-basic+clip+deltaloss``: the scorers that share the pass's one read and decode."""
    return "score-" + "+".join(_names(parameters["scorers"]))


class PassProgress:
    """A fused pass's progress in Prefect: a progress artifact (shard results done over shard
    results to do, every scorer counted) updated at most every ``every`` seconds, a log line per
    scorer at each tenth of its shards, and every failed shard logged as it comes."""

    def __init__(self, names: list[str], shards: int, log: Any, every: float = 2.0) -> None:
        from prefect.artifacts import create_progress_artifact

        self.names, self.shards, self.log, self.every = names, shards, log, every
        self.total = max(1, shards * len(names))
        self.count, self.rows = 0, {n: 0 for n in names}
        self.last = 0.0
        self.artifact = create_progress_artifact(0.0, description=f"{_pass_run_name({'scorers': names})}: "
                                                 f"{shards} shard(s), one read and one decode each")

    def __call__(self, result: Any, done: int, total: int) -> None:
        import time

        from prefect.artifacts import update_progress_artifact

        self.count += 1
        self.rows[result.scorer] += result.rows if not (result.skipped or result.failed) else 0
        if result.failed:
            self.log.warning("[%s] %s FAILED: %s", result.scorer, result.url, result.failed)
        step = max(1, total // 10)
        if done % step == 0 or done == total:
            self.log.info("[%s] %d/%d shards (%d rows scored, last: %s%s)", result.scorer, done, total,
                          self.rows[result.scorer], result.url, ", already done" if result.skipped else "")
        now = time.monotonic()
        if now - self.last >= self.every or self.count == self.total:
            self.last = now
            update_progress_artifact(self.artifact, 100.0 * self.count / self.total)


def _pass_reads(reports: list[Any]) -> dict[str, Any]:
    """How often the pass read each shard it scored: results of one read share its worker's pid and
    start time (1.0 when every scorer was fed from one read of each shard)."""
    scored = [r for rep in reports for r in rep.scored]
    reads = {(r.url, r.pid, r.started_at) for r in scored}
    shards = {r.url for r in scored}
    return {"scorers": [rep.scorer for rep in reports], "shard_reads": len(reads),
            "reads_per_shard": round(len(reads) / len(shards), 3) if shards else None}


@task(name="score", retries=2, retry_delay_seconds=5, task_run_name=_pass_run_name,
      cache_policy=ByContent(content=score_key, exclude=["plan"]), cache_expiration=CACHE_TTL, persist_result=True)
def score_task(plan: ScoringPlan, scorers: str | list[str]) -> list[dict[str, Any]]:
    """One fused pass of a resolved scoring plan (``ScoringPlan.passes``: the scorers that run on
    one kind of device) over all its shards, on Ray: each shard read and decoded once for all of
    them, each scorer writing its own score files, as ``curate score`` does. One summary per
    scorer, in order, each with the pass's ``shard_reads``."""
    names = _names(scorers)
    reports = plan.run_pass(names, PassProgress(names, len(plan.tasks), get_run_logger()))
    reads = _pass_reads(reports)
    summaries = [{**r.summary(), "pass": reads} for r in reports]
    failed = {s["scorer"]: s["failed"] for s in summaries if s["failed"]}
    if failed:
        raise RuntimeError("; ".join(f"{n}: {len(f)} shard(s) failed: {f[:3]}" for n, f in failed.items()))
    return summaries


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


def run_scores(plan: ScoringPlan) -> list[dict[str, Any]]:
    """Every scorer of the plan, one ``score_task`` per fused pass (``plan.passes()``, in order; a
    pass is forced to run, and re-cache, when any score file it writes is missing); one summary
    per scorer, in the recipe's order."""
    done: dict[str, dict[str, Any]] = {}
    for names in plan.passes():
        for summary in fresh_unless(score_task, plan.outputs_present(*names))(plan, names):
            done[summary["scorer"]] = summary
    return [done[n] for n in plan.scorer_names]


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
