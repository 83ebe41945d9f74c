"""Select, reshard and write the manifest: scores in, curated dataset out."""

from __future__ import annotations

from typing import Any, Callable

from curation.data import storage
from curation.selection.manifest import Manifest, build_manifest, write_manifest
from curation.data.outlock import output_lock
from curation.selection.policy import Policy, PolicyError, SelectionResult, load_policy, run_selection
from curation.selection.reshard import InputShard, ReshardConfig, ReshardError, reshard
from curation.scoring.store import ScoreStore


def kept_keys(decisions_url: str, storage_options: dict | None = None) -> dict[tuple[str, str], list[str]]:
    """Every kept key per (dataset, shard), in memory: for tests and small tables (resharding reads
    them a group at a time, ``curation.selection.kept``)."""
    import io

    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(storage.read_bytes(decisions_url, storage_options)))
    out: dict[tuple[str, str], list[str]] = {}
    for ds, shard, key, dropped in zip(*(t.column(c).to_pylist() for c in ("dataset", "shard", "key", "dropped_by"))):
        lst = out.setdefault((ds, shard), [])
        if dropped is None:
            lst.append(key)
    return out


def select(work: str, policy: str | dict | Policy, storage_options: dict | None = None, *,
           allow_incomplete: bool = False, resources: Any = None) -> SelectionResult:
    pol = policy if isinstance(policy, Policy) else load_policy(policy)
    return run_selection(ScoreStore(work, storage_options), pol, allow_incomplete=allow_incomplete, resources=resources)


def reshard_inputs(decisions: str, shards: dict[tuple[str, str], dict[str, Any]],
                   storage_options: dict | None = None) -> list[InputShard]:
    """The reshard's inputs, each knowing how many of its samples are kept; its group reads the
    keys from ``decisions`` when it runs (no list of every kept key is ever held)."""
    from curation.selection.kept import scan_kept

    return _inputs(scan_kept(decisions, storage_options), decisions, shards)


def _inputs(scan: Any, decisions: str, shards: dict[tuple[str, str], dict[str, Any]]) -> list[InputShard]:
    per_shard = scan.per_shard
    missing = sorted(k for k, (n, _) in per_shard.items() if n and k not in shards)
    if missing:
        raise ReshardError(f"scores without recorded input shards: {missing[:5]}")
    if scan.duplicates:
        raise ReshardError(f"the same key is kept in more than one shard of a dataset, which would give a curated "
                           f"shard two samples with one key: {scan.duplicates}")
    return [InputShard(ds, shard, rec["url"], rec["checksum"], kept_count=per_shard.get((ds, shard), (0, ""))[0],
                       kept_hash=per_shard.get((ds, shard), (0, ""))[1], decisions=decisions)
            for (ds, shard), rec in sorted(shards.items())]


def plan_from_decisions(decisions: str, max_samples: int = 1000, storage_options: dict | None = None) -> dict[str, int]:
    """A dry run of the reshard planner on a decision table alone (``benchmarks/bench_scale.py``):
    its groups and kept samples, with what ``reshard`` holds while planning."""
    from curation.selection.kept import scan_kept
    from curation.selection.reshard import plan_groups

    scan = scan_kept(decisions, storage_options)
    shards = {k: {"url": f"{k[0]}/{k[1]}.tar", "checksum": ""} for k in scan.per_shard}
    groups = plan_groups(_inputs(scan, decisions, shards), ReshardConfig(max_samples=max_samples))
    return {"groups": len(groups), "kept": sum(g.expected for g in groups)}


def curate(work: str, policy: str | dict | Policy, out: str, cfg: ReshardConfig | None = None,
           **kwargs: Any) -> tuple[Manifest, str]:
    """``curate_unlocked`` holding ``out``'s lock: a second run to the same ``out`` is refused at
    once (``OutputLockedError``, naming the run that holds it) and writes nothing."""
    with output_lock(out, kwargs.get("storage_options")):
        return curate_unlocked(work, policy, out, cfg, **kwargs)


def curate_unlocked(
    work: str,
    policy: str | dict | Policy,
    out: str,
    cfg: ReshardConfig | None = None,
    *,
    storage_options: dict | None = None,
    use_ray: bool = True,
    progress: Callable[[Any, int, int], None] | None = None,
    allow_incomplete: bool = False,
    resources: Any = None,
) -> tuple[Manifest, str]:
    """Apply ``policy`` to the scores under ``work``; write curated shards and ``<out>/manifest.json``.

    Everything that can be refused is refused before any shard is written: a policy naming
    unknown columns or datasets, a stage that does not exist, an input shard that is gone, a
    scorer the policy reads with no scores for some shard (unless ``allow_incomplete``).
    An input shard whose bytes changed since it was scored is refused as it is read: its
    group writes nothing and no manifest is written.
    """
    cfg = cfg or ReshardConfig()
    pol = policy if isinstance(policy, Policy) else load_policy(policy)
    store = ScoreStore(work, storage_options)
    if not store.views:
        raise PolicyError(f"no score files under {store.root}; run `curate score` first")
    shards, scorers = store.inputs()
    selection = run_selection(store, pol, allow_incomplete=allow_incomplete, resources=resources)
    inputs = reshard_inputs(selection.decisions_url, shards, storage_options)
    result = reshard(inputs, out, cfg, storage_options=storage_options, use_ray=use_ray, progress=progress)
    from dataclasses import asdict

    manifest = build_manifest(work=work, inputs=shards, sizes=result.input_sizes, scorers=scorers, policy=pol,
                              selection=selection, reshard_result=result, reshard_cfg={k: v for k, v in asdict(cfg).items() if k != "workers"})
    url = write_manifest(manifest, storage.join(out, "manifest.json"), storage_options)
    return manifest, url
