"""Byte-exact resharding: copy the kept samples' members, unchanged, into new shards.

Input shards are streamed (never extracted), kept samples' members are copied byte for byte
(no decoding, no re-encoding; each member's tar header and data blocks are copied verbatim)
into new WebDataset shards of at most ``max_samples`` samples
or ``max_bytes`` bytes, with an optional deterministic shuffle. Work is split into groups of
consecutive input shards, each written by one Ray task; a group is recorded as complete
(``_groups/<dataset>-<group>.json``) only after all its shards are written, so a killed run
redoes only unfinished groups. Each output shard gets a ``<shard>_stats.json``; each dataset
gets a wids index ``index.wids.json`` (``wids-shard-index-v1``).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from curation import io as cio
from curation.shards import file_checksum, split_key
from curation.tarstream import RawTarWriter, TarFormatError, final_size, scan


class ReshardError(RuntimeError):
    pass


@dataclass
class ReshardConfig:
    max_samples: int = 1000
    max_bytes: int = 1 << 30
    shuffle_seed: int | None = None  # None keeps input order
    shuffle_buffer: int = 1000
    group_samples: int | None = None  # kept samples per task (default 4 x max_samples)
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
    kept: list[str] = field(default_factory=list)  # kept keys, in tar order is not required


@dataclass
class Group:
    dataset: str
    index: int
    inputs: list[InputShard]
    plan_hash: str = ""

    @property
    def expected(self) -> int:
        return sum(len(i.kept) for i in self.inputs)


@dataclass
class GroupResult:
    dataset: str
    index: int
    shards: list[dict[str, Any]]
    copied: int
    bytes_read: int
    seconds: float
    skipped: bool = False


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_groups(inputs: list[InputShard], cfg: ReshardConfig) -> list[Group]:
    """Split each dataset's inputs into consecutive groups of about ``group_samples`` kept samples."""
    target = cfg.group_samples or 4 * cfg.max_samples
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
            if not inp.kept:
                continue
            current.append(inp)
            n += len(inp.kept)
            if n >= target:
                groups.append(Group(ds, idx, current))
                idx, current, n = idx + 1, [], 0
        if current:
            groups.append(Group(ds, idx, current))
    for g in groups:
        # workers only change how fast the plan runs, not what it writes
        layout = {k: v for k, v in asdict(cfg).items() if k != "workers"}
        g.plan_hash = _hash({"cfg": layout, "dataset": g.dataset, "index": g.index,
                             "inputs": [(i.url, i.checksum, sorted(i.kept)) for i in g.inputs]})
    return groups


def _group_record_url(out: str, g: Group) -> str:
    return cio.join(out, g.dataset, "_groups", f"{g.dataset}-{g.index:05d}.json")


def _load_done(out: str, g: Group, storage_options: dict | None) -> GroupResult | None:
    url = _group_record_url(out, g)
    if not cio.exists(url, storage_options):
        return None
    try:
        rec = json.loads(cio.read_bytes(url, storage_options))
    except ValueError:
        return None
    if rec.get("plan_hash") != g.plan_hash:
        return None
    fs, _ = cio.get_fs(out, storage_options)
    for s in rec["shards"]:
        _, path = cio.get_fs(s["url"], storage_options)
        if not fs.exists(path) or fs.size(path) != s["filesize"]:
            return None
    return GroupResult(g.dataset, g.index, rec["shards"], rec["copied"], 0, 0.0, skipped=True)


def _samples_of(g: Group, storage_options: dict | None, counter: dict[str, int]) -> Iterator[tuple[str, str, list[Any]]]:
    """(input shard, key, raw member blocks) of every kept sample, in tar order."""
    for inp in g.inputs:
        keep = set(inp.kept)
        found = 0
        with cio.open_url(inp.url, "rb", storage_options) as f:
            key: str | None = None
            raws: list[Any] = []
            seen: set[str] = set()
            try:
                for entry in scan(f):
                    parts = split_key(entry.name)
                    k = parts[0] if parts else entry.name
                    if k != key:
                        if k in seen:
                            continue  # a repeated, non-contiguous key: the reader skipped it too
                        if key in keep:
                            found += 1
                            yield inp.shard, key, raws
                        key, raws = k, []
                        seen.add(k)
                    if not entry.is_file:
                        raise ReshardError(f"input shard {inp.url}: member {entry.name!r} is a link or device")
                    raws.append(entry)
            except TarFormatError as e:
                raise ReshardError(f"input shard {inp.url}: {e}") from None
            if key in keep:
                found += 1
                yield inp.shard, key, raws
            counter["bytes_read"] += f.tell() if hasattr(f, "tell") else 0
        if found != len(keep):
            raise ReshardError(f"input shard {inp.url} has {found} of the {len(keep)} kept samples the scores "
                               f"list; it changed since it was scored")


class _RawShardWriter:
    """Numbered output shards of raw member blocks, rolled by sample count and bytes."""

    def __init__(self, ds_url: str, pattern: str, max_samples: int, max_bytes: int, storage_options: dict | None) -> None:
        self.ds_url, self.pattern = ds_url, pattern
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.storage_options = storage_options
        self.index = 0
        self.shards: list[dict[str, Any]] = []
        self._ctx: Any = None
        self._w: RawTarWriter | None = None
        self._n = 0
        self._sources: dict[str, int] = {}
        self._url = ""

    def _open(self) -> None:
        self._url = cio.join(self.ds_url, self.pattern.format(index=self.index))
        self.index += 1
        self._ctx = cio.atomic_write(self._url, self.storage_options)
        self._w = RawTarWriter(self._ctx.__enter__())
        self._n, self._sources = 0, {}

    def _close(self) -> None:
        if self._w is None:
            return
        self._w.close()
        self._ctx.__exit__(None, None, None)
        self.shards.append({"url": self._url, "nsamples": self._n, "filesize": self._w.size,
                            "md5sum": self._w.md5.hexdigest(), "sources": self._sources})
        self._w = self._ctx = None

    def write(self, src: str, raws: list[Any]) -> None:
        size = sum(r.nbytes for r in raws)
        if self._w is not None and (self._n >= self.max_samples or
                                    (self._n and final_size(self._w.size + size) > self.max_bytes)):
            self._close()
        if self._w is None:
            self._open()
        for r in raws:
            self._w.write_raw(r.header, r.body)
        self._n += 1
        self._sources[src] = self._sources.get(src, 0) + 1

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self, exc: BaseException) -> None:
        if self._w is not None:
            self._w.abort()
        if self._ctx is not None:
            try:
                self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:  # noqa: BLE001 - the context re-raises exc; the caller raises it
                pass
            self._w = self._ctx = None


def write_group(g: Group, out: str, cfg: ReshardConfig, storage_options: dict | None = None) -> GroupResult:
    """Copy one group's kept samples into new shards (idempotent: a complete group is skipped)."""
    done = _load_done(out, g, storage_options)
    if done is not None:
        return done
    t0 = time.time()
    counter = {"bytes_read": 0}
    ds_url = cio.join(out, g.dataset)
    _remove_parts(ds_url, f"{g.dataset}-{g.index:05d}-", storage_options)  # leftovers of an earlier plan
    stream = _samples_of(g, storage_options, counter)
    if cfg.shuffle_seed is not None:
        stream = _shuffled(stream, cfg.shuffle_buffer, random.Random(f"{cfg.shuffle_seed}:{g.dataset}:{g.index}"))
    writer = _RawShardWriter(ds_url, f"{g.dataset}-{g.index:05d}-{{index:04d}}.tar", cfg.max_samples, cfg.max_bytes,
                             storage_options)
    copied = 0
    try:
        for src_shard, _key, raws in stream:
            writer.write(src_shard, raws)
            copied += 1
    except BaseException as e:
        writer.abort(e)
        raise
    written = writer.close()
    if copied != g.expected:
        raise ReshardError(f"group {g.dataset}/{g.index}: copied {copied} samples, expected {g.expected}")
    shards = []
    for ws in written:
        stats = {**ws, "dataset": g.dataset}
        cio.write_bytes(ws["url"][: -len(".tar")] + "_stats.json", json.dumps(stats, indent=2).encode(), storage_options)
        shards.append(stats)
    record = {"plan_hash": g.plan_hash, "dataset": g.dataset, "group": g.index, "copied": copied, "shards": shards}
    cio.write_bytes(_group_record_url(out, g), json.dumps(record, indent=2).encode(), storage_options)
    return GroupResult(g.dataset, g.index, shards, copied, counter["bytes_read"], time.time() - t0)


def _remove_parts(ds_url: str, prefix: str, storage_options: dict | None) -> None:
    """Delete output shards (and stats) of one group left by an earlier, different plan."""
    for url in cio.list_files(ds_url, storage_options=storage_options):
        name = cio.basename(url)
        if name.startswith(prefix) and (name.endswith(".tar") or name.endswith("_stats.json")):
            fs, path = cio.get_fs(url, storage_options)
            fs.rm(path)


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


def check_inputs_unchanged(inputs: list[InputShard], storage_options: dict | None = None) -> dict[str, int]:
    """Refuse to reshard from shards whose bytes differ from the ones that were scored.
    Returns each input's size, read on the way."""
    sizes = {}
    for inp in inputs:
        if not cio.exists(inp.url, storage_options):
            raise ReshardError(f"input shard {inp.url} ({inp.dataset}/{inp.shard}) no longer exists")
        sizes[inp.url], now = file_checksum(inp.url, storage_options)
        if now != inp.checksum:
            raise ReshardError(f"input shard {inp.url} ({inp.dataset}/{inp.shard}) changed since it was scored "
                               f"(checksum {inp.checksum} then, {now} now); score it again")
    return sizes


def write_index(out: str, dataset: str, shards: list[dict[str, Any]], storage_options: dict | None = None) -> str:
    """A wids shard index next to the shards (URLs relative to the index)."""
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": dataset,
        "shardlist": [{"url": cio.basename(s["url"]), "nsamples": s["nsamples"], "filesize": s["filesize"],
                       "md5sum": s["md5sum"]} for s in shards],
    }
    url = cio.join(out, dataset, "index.wids.json")
    cio.write_bytes(url, json.dumps(index, indent=2).encode(), storage_options)
    return url


@dataclass
class ReshardResult:
    out: str
    datasets: dict[str, dict[str, Any]]  # dataset -> {index, shards: [...], samples}
    groups: list[GroupResult]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "seconds": round(self.seconds, 2),
            "groups": len(self.groups),
            "groups_skipped": sum(g.skipped for g in self.groups),
            "datasets": {k: {"samples": v["samples"], "shards": len(v["shards"]), "index": v["index"]}
                         for k, v in self.datasets.items()},
        }


def reshard(
    inputs: list[InputShard],
    out: str,
    cfg: ReshardConfig | None = None,
    *,
    storage_options: dict | None = None,
    use_ray: bool = True,
    progress: Callable[[GroupResult, int, int], None] | None = None,
    check_inputs: bool = True,
) -> ReshardResult:
    """Write every input's kept samples into new shards under ``out/<dataset>/``."""
    cfg = cfg or ReshardConfig()
    t0 = time.time()
    if check_inputs:
        check_inputs_unchanged(inputs, storage_options)
    groups = plan_groups(inputs, cfg)
    results: list[GroupResult] = []
    if use_ray and len(groups) > 1:
        import ray

        from curation.engine import ensure_ray

        ensure_ray()
        task = ray.remote(num_cpus=1, max_retries=2)(write_group)
        pending = {}
        queue = list(groups)
        while queue or pending:
            while queue and len(pending) < max(1, cfg.workers):
                g = queue.pop(0)
                pending[task.remote(g, out, cfg, storage_options)] = g
            ready, _ = ray.wait(list(pending), num_returns=1)
            g = pending.pop(ready[0])
            try:
                r = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001
                cause = getattr(e, "cause", None) or e
                raise ReshardError(f"resharding {g.dataset} group {g.index} failed: {cause}") from None
            results.append(r)
            if progress:
                progress(r, len(results), len(groups))
    else:
        for g in groups:
            r = write_group(g, out, cfg, storage_options)
            results.append(r)
            if progress:
                progress(r, len(results), len(groups))
    results.sort(key=lambda r: (r.dataset, r.index))
    datasets: dict[str, dict[str, Any]] = {}
    for ds in sorted({i.dataset for i in inputs}):
        shards = [s for r in results if r.dataset == ds for s in r.shards]
        datasets[ds] = {"index": write_index(out, ds, shards, storage_options) if shards else None,
                        "shards": shards, "samples": sum(s["nsamples"] for s in shards)}
    return ReshardResult(out, datasets, results, time.time() - t0)

