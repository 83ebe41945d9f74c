"""Byte-exact resharding: copy the kept samples' members, unchanged, into new shards.

Input shards are streamed (never extracted), kept samples' members are copied byte for byte
(no decoding, no re-encoding; each member's tar header and data blocks are copied verbatim)
into new WebDataset shards of at most ``max_samples`` samples
or ``max_bytes`` bytes, with an optional deterministic shuffle. Work is split into groups of
consecutive input shards, each written by one Ray task; a group is recorded as complete
(``_groups/<dataset>-<group>.json``) only after all its shards are written, so a killed run
redoes only unfinished groups. Each output shard gets a ``<shard>_stats.json``; each dataset
gets a wids index ``index.wids.json`` (``wids-shard-index-v1``).

Every input byte is read once (``verified_copy``, ``plain_tar``, ``reshard_inputs``): it is hashed as it
is read, and the input refused, with its group's output discarded, when the hash is not the checksum the
shard was scored with. Kept samples holding members that must never be written (absolute or ``..`` paths,
links, devices) are left out and named, whatever the policy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from curation.data import storage
from curation.selection.reshard_inputs import ReshardError, kept_spans, stat_inputs, tar_samples
from curation.selection.plain_tar import Scanner, UnusualTar, plain_samples
from curation.selection.sample_spans import span_samples
from curation.selection.verified_copy import GroupWriter

log = logging.getLogger(__name__)


@dataclass
class ReshardConfig:
    max_samples: int = 1000
    max_bytes: int = 1 << 30
    shuffle_seed: int | None = None  # None keeps input order
    shuffle_buffer: int = 1000
    # kept samples per task (default 2 x max_samples: groups of the same size, enough of them that
    # two workers end together instead of one writing the last group alone)
    group_samples: int | None = None
    workers: int = 2

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_bytes < 1024:
            raise ValueError("max_samples must be >= 1 and max_bytes >= 1024")


@dataclass
class InputShard:
    dataset: str
    shard: str
    url: str
    checksum: str
    kept: list[str] = field(default_factory=list)  # kept keys (any order), or read from ``decisions`` by its group
    kept_count: int | None = None  # with ``decisions``: how many are kept
    kept_hash: str = ""  # with ``decisions``: a fingerprint of the kept keys (curation.selection.kept)
    decisions: str | None = None  # the decision table the group reads this shard's kept keys from

    @property
    def n_kept(self) -> int:
        return self.kept_count if self.kept_count is not None else len(self.kept)


@dataclass
class Group:
    dataset: str
    index: int
    inputs: list[InputShard]
    plan_hash: str = ""

    @property
    def expected(self) -> int:
        return sum(i.n_kept for i in self.inputs)


@dataclass
class GroupResult:
    dataset: str
    index: int
    shards: list[dict[str, Any]]
    copied: int
    bytes_read: int
    seconds: float
    skipped: bool = False
    refused: list[dict[str, str]] = field(default_factory=list)  # kept samples not written, and why
    input_sizes: dict[str, int] = field(default_factory=dict)  # bytes read and verified per input URL


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_groups(inputs: list[InputShard], cfg: ReshardConfig) -> list[Group]:
    """Split each dataset's inputs into consecutive groups of about ``group_samples`` kept samples."""
    target = cfg.group_samples or 2 * cfg.max_samples
    by_ds: dict[str, list[InputShard]] = {}
    for inp in sorted(inputs, key=lambda i: (i.dataset, i.shard)):
        by_ds.setdefault(inp.dataset, []).append(inp)
    groups: list[Group] = []
    for ds, items in by_ds.items():
        if cfg.shuffle_seed is not None:
            random.Random(f"{cfg.shuffle_seed}:{ds}").shuffle(items)
        current: list[InputShard] = []
        n = 0
        idx = 0
        for inp in items:
            if not inp.n_kept:
                continue
            current.append(inp)
            n += inp.n_kept
            if n >= target:
                groups.append(Group(ds, idx, current))
                idx, current, n = idx + 1, [], 0
        if current:
            groups.append(Group(ds, idx, current))
    for g in groups:
        # workers only change how fast the plan runs, not what it writes
        layout = {k: v for k, v in asdict(cfg).items() if k != "workers"}
        g.plan_hash = _hash({"cfg": layout, "dataset": g.dataset, "index": g.index,
                             "inputs": [(i.url, i.checksum, i.kept_hash or sorted(i.kept)) for i in g.inputs]})
    return groups


def _group_record_url(out: str, g: Group) -> str:
    return storage.join(out, g.dataset, "_groups", f"{g.dataset}-{g.index:05d}.json")


def _load_done(out: str, g: Group, storage_options: dict | None) -> GroupResult | None:
    url = _group_record_url(out, g)
    if not storage.exists(url, storage_options):
        return None
    try:
        rec = json.loads(storage.read_bytes(url, storage_options))
    except ValueError:
        return None
    if rec.get("plan_hash") != g.plan_hash:
        return None
    fs, _ = storage.get_fs(out, storage_options)
    for s in rec["shards"]:
        _, path = storage.get_fs(s["url"], storage_options)
        if not fs.exists(path) or fs.size(path) != s["filesize"]:
            return None
    return GroupResult(g.dataset, g.index, rec["shards"], rec["copied"], 0, 0.0, skipped=True,
                       refused=rec.get("refused", []))


def write_group(g: Group, out: str, cfg: ReshardConfig, storage_options: dict | None = None) -> GroupResult:
    """Copy one group's kept samples into new shards (idempotent: a complete group is skipped).

    One pass per input byte, hashed as it is read and checked against the checksum it was scored
    with; the group's shards become visible only once all its inputs passed. Kept samples with
    members that must not be written are left out and named. Plain members take the fast path
    (``plain_tar``); a group holding anything else is written again with the full scanner.
    """
    done = _load_done(out, g, storage_options)
    if done is not None:
        return done
    try:
        return _write_group(g, out, cfg, storage_options, plain_samples)
    except UnusualTar as e:
        log.info("group %s/%s: %s; writing it with the full tar scanner", g.dataset, g.index, e)
        return _write_group(g, out, cfg, storage_options, tar_samples)


def _write_group(g: Group, out: str, cfg: ReshardConfig, storage_options: dict | None, scanner: Scanner) -> GroupResult:
    t0 = time.time()
    ds_url = storage.join(out, g.dataset)
    _remove_parts(ds_url, f"{g.dataset}-{g.index:05d}-", storage_options)  # leftovers of an earlier plan
    sizes: dict[str, int] = {}
    refused: list[dict[str, str]] = []
    samples = kept_spans(g, storage_options, sizes, refused, scanner)
    stream = samples
    if cfg.shuffle_seed is not None:  # the shuffle moves samples one by one
        one_by_one = ((shard, s) for shard, span in samples for s in span_samples(span))
        stream = _shuffled(one_by_one, cfg.shuffle_buffer, random.Random(f"{cfg.shuffle_seed}:{g.dataset}:{g.index}"))
    copied = 0
    with GroupWriter(ds_url, f"{g.dataset}-{g.index:05d}-{{index:04d}}.tar", cfg.max_samples, cfg.max_bytes,
                     storage_options) as writer:
        try:
            for src_shard, span in stream:
                writer.write(src_shard, span)
                copied += len(span.keys)
        finally:
            stream.close()
            samples.close()  # closes the input being read if the loop ended early
        if copied + len(refused) != g.expected:
            raise ReshardError(f"group {g.dataset}/{g.index}: copied {copied} and refused {len(refused)} samples, "
                               f"expected {g.expected}")
        written = writer.commit()
    shards = []
    for ws in written:
        stats = {**ws, "dataset": g.dataset}
        storage.write_bytes(ws["url"][: -len(".tar")] + "_stats.json", json.dumps(stats, indent=2).encode(), storage_options)
        shards.append(stats)
    record = {"plan_hash": g.plan_hash, "dataset": g.dataset, "group": g.index, "copied": copied, "shards": shards,
              "refused": refused}
    storage.write_bytes(_group_record_url(out, g), json.dumps(record, indent=2).encode(), storage_options)
    return GroupResult(g.dataset, g.index, shards, copied, sum(sizes.values()), time.time() - t0, refused=refused,
                       input_sizes=sizes)


def _remove_parts(ds_url: str, prefix: str, storage_options: dict | None) -> None:
    """Delete output shards (and stats) of one group left by an earlier, different plan, and the
    temp files of a run of it that was killed."""
    for url in storage.list_files(ds_url, storage_options=storage_options):
        name = storage.basename(url)
        if name.startswith(prefix) and (name.endswith(".tar") or name.endswith("_stats.json")):
            fs, path = storage.get_fs(url, storage_options)
            fs.rm(path)
    if not storage.is_remote(ds_url) and os.path.isdir(ds_url):
        for name in os.listdir(ds_url):
            if name.startswith(f".{prefix}") and ".tmp-" in name:
                os.unlink(os.path.join(ds_url, name))


def _shuffled(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for item in stream:
        buf.append(item)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def write_index(out: str, dataset: str, shards: list[dict[str, Any]], storage_options: dict | None = None) -> str:
    """A wids shard index next to the shards (URLs relative to the index)."""
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": dataset,
        "shardlist": [{"url": storage.basename(s["url"]), "nsamples": s["nsamples"], "filesize": s["filesize"],
                       "md5sum": s["md5sum"]} for s in shards],
    }
    url = storage.join(out, dataset, "index.wids.json")
    storage.write_bytes(url, json.dumps(index, indent=2).encode(), storage_options)
    return url


@dataclass
class ReshardResult:
    out: str
    datasets: dict[str, dict[str, Any]]  # dataset -> {index, shards: [...], samples, refused: [...]}
    groups: list[GroupResult]
    seconds: float
    input_sizes: dict[str, int] = field(default_factory=dict)  # every input URL -> bytes

    def summary(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "seconds": round(self.seconds, 2),
            "groups": len(self.groups),
            "groups_skipped": sum(g.skipped for g in self.groups),
            "datasets": {k: {"samples": v["samples"], "shards": len(v["shards"]), "index": v["index"],
                             "refused": v["refused"]} for k, v in self.datasets.items()},
        }


def _on_ray(groups: list[Group], out: str, cfg: ReshardConfig, storage_options: dict | None,
            done: Callable[[GroupResult], None]) -> None:
    """Groups as Ray tasks, ``cfg.workers`` at a time. After a failure no new group starts; the
    running ones finish (their inputs verified, they stay for a rerun), then the failure is raised."""
    import ray

    from curation.common.raycluster import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(write_group)
    pending: dict[Any, Group] = {}
    queue = list(groups)
    failure: ReshardError | None = None
    while (queue and failure is None) or pending:
        while queue and failure is None and len(pending) < max(1, cfg.workers):
            g = queue.pop(0)
            pending[task.remote(g, out, cfg, storage_options)] = g
        ready, _ = ray.wait(list(pending), num_returns=1)
        g = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - the task's own error, named with its group
            cause = getattr(e, "cause", None) or e
            failure = failure or ReshardError(f"resharding {g.dataset} group {g.index} failed: {cause}")
            continue
        done(result)
    if failure is not None:
        raise failure


def _new_dirs(out: str, datasets: set[str]) -> list[str]:
    """Local folders this run would create, deepest first (removed again if a refusal leaves them empty)."""
    if storage.is_remote(out):
        return []
    paths = [os.path.join(out, ds, "_groups") for ds in sorted(datasets)] + \
            [os.path.join(out, ds) for ds in sorted(datasets)] + [out]
    return [p for p in paths if not os.path.exists(p)]


def reshard(
    inputs: list[InputShard],
    out: str,
    cfg: ReshardConfig | None = None,
    *,
    storage_options: dict | None = None,
    use_ray: bool = True,
    progress: Callable[[GroupResult, int, int], None] | None = None,
) -> ReshardResult:
    """Write every input's kept samples into new shards under ``out/<dataset>/``.

    Inputs that are gone (or whose ETag moved) are refused before anything is written; an
    input whose bytes changed is refused when its group reads it, and that group's output
    is discarded (groups that completed stay, and a rerun keeps them).
    """
    cfg = cfg or ReshardConfig()
    t0 = time.time()
    sizes = stat_inputs(inputs, storage_options)
    groups = plan_groups(inputs, cfg)
    results: list[GroupResult] = []

    def done(r: GroupResult) -> None:
        results.append(r)
        if progress:
            progress(r, len(results), len(groups))

    new_dirs = _new_dirs(out, {g.dataset for g in groups})
    try:
        if use_ray and len(groups) > 1:
            _on_ray(groups, out, cfg, storage_options, done)
        else:
            for g in groups:
                done(write_group(g, out, cfg, storage_options))
    except BaseException:
        for d in new_dirs:
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    results.sort(key=lambda r: (r.dataset, r.index))
    datasets: dict[str, dict[str, Any]] = {}
    for ds in sorted({i.dataset for i in inputs}):
        shards = [s for r in results if r.dataset == ds for s in r.shards]
        datasets[ds] = {"index": write_index(out, ds, shards, storage_options) if shards else None,
                        "shards": shards, "samples": sum(s["nsamples"] for s in shards),
                        "refused": [x for r in results if r.dataset == ds for x in r.refused]}
    return ReshardResult(out, datasets, results, time.time() - t0, sizes)
