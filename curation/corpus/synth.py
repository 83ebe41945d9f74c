"""Synthetic corpus: realistic shards of all three kinds, with known, injected noise.

No real corpus can be downloaded where this service is developed and tested, so this
module writes shards in the real layouts (img2dataset pairs with their per-shard
``.parquet`` and ``_stats.json``, MMC4 documents, video2dataset clips) whose content is
simple enough for tiny models to learn: colored shapes on colored backgrounds, captions
that describe them truthfully, and clips of a shape moving in a stated direction.

Noise is injected at configurable rates and the truth is written to
``<out>/ground_truth.parquet`` (never inside the shards), one row per sample:
``dataset, kind, shard, key, noise, source_key, detail``. ``noise`` is ``"clean"`` or
one of the ``*_NOISE`` names below.

The pieces: ``scenes`` (what is drawn and said), ``noise`` (what is injected, at which default
rates), ``spec`` (what to synthesize), one generator per kind (``pairs``, ``interleaved``,
``video``) and, here, writing shards in parallel and the ground truth.

Everything is deterministic by seed: each shard is generated from its own seed
``(seed, dataset, shard index)``, so shards can be generated in parallel and any
single shard can be regenerated alone.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from curation.corpus.interleaved import gen_interleaved_shard
from curation.corpus.noise import DEFAULT_PAIR_RATES, NOISE_TYPES, UNREADABLE_NOISE
from curation.corpus.pairs import gen_pair_shard
from curation.corpus.scenes import COLORS, POSITIONS, SHAPES, Scene, encode_image, encode_mp4, render_clip, render_scene
from curation.corpus.spec import DatasetSpec, SynthConfig
from curation.corpus.video import gen_video_shard
from curation.data import storage
from curation.data.writer import ShardWriter, WrittenShard

# the corpus' public names, wherever they are defined, in one import
__all__ = ["synthesize", "load_ground_truth", "SynthResult", "SynthConfig", "DatasetSpec", "Scene", "render_scene",
           "encode_image", "render_clip", "encode_mp4", "COLORS", "POSITIONS", "SHAPES", "NOISE_TYPES", "UNREADABLE_NOISE",
           "DEFAULT_PAIR_RATES", "GENERATORS"]

GENERATORS: dict[str, Callable[..., Iterator[tuple[dict, dict]]]] = {
    "pair": gen_pair_shard,
    "interleaved": gen_interleaved_shard,
    "video": gen_video_shard,
}


# --------------------------------------------------------------------------- writing


def _write_shard(args: tuple[DatasetSpec, SynthConfig, str, int, dict | None]) -> tuple[WrittenShard, list[dict]]:
    spec, cfg, out, shard_idx, storage_options = args
    start = shard_idx * spec.samples_per_shard
    count = min(spec.samples_per_shard, spec.samples - start)
    ds_url = storage.join(out, spec.name)
    truth: list[dict] = []
    t0 = time.time()
    rows = []
    writer = ShardWriter(ds_url, "{index:05d}.tar", max_samples=count, max_bytes=1 << 40, start_index=shard_idx,
                         storage_options=storage_options)
    with writer:
        for sample, gt in GENERATORS[spec.kind](spec, cfg, shard_idx, start, count):
            writer.write(sample)
            truth.append({"dataset": spec.name, "kind": spec.kind, "shard": f"{shard_idx:05d}", **gt})
            if spec.kind == "pair":
                rows.append(json.loads(sample["json"]))
    written = writer.written[0]
    if spec.kind == "pair":
        # img2dataset writes a per-shard parquet of sample metadata and a stats file beside each tar
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        storage.write_bytes(storage.join(ds_url, f"{shard_idx:05d}.parquet"), buf.getvalue(), storage_options)
        stats = {
            "count": count,
            "successes": count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": round(time.time() - t0, 3),
            "status_dict": {"success": count},
        }
        storage.write_bytes(storage.join(ds_url, f"{shard_idx:05d}_stats.json"), json.dumps(stats, indent=2).encode(), storage_options)
    return written, truth


@dataclass
class SynthResult:
    out: str
    shards: dict[str, list[WrittenShard]]
    ground_truth: str
    counts: dict[str, dict[str, int]]  # dataset -> noise -> samples

    def summary(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "ground_truth": self.ground_truth,
            "datasets": {
                name: {
                    "shards": len(shards),
                    "samples": sum(s.nsamples for s in shards),
                    "bytes": sum(s.filesize for s in shards),
                    "noise": self.counts.get(name, {}),
                }
                for name, shards in self.shards.items()
            },
        }


def synthesize(
    out: str,
    config: SynthConfig | None = None,
    *,
    workers: int = 1,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> SynthResult:
    """Write the corpus under ``out`` (a folder or ``s3://bucket/prefix``).

    Layout: ``<out>/<dataset>/<shard>.tar`` (+ ``.parquet`` and ``_stats.json`` for pairs),
    ``<out>/ground_truth.parquet`` and ``<out>/corpus.json``. ``progress(dataset, n)`` is
    called as each shard of n samples finishes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = config or SynthConfig.preset("small")
    names = [d.name for d in cfg.datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique, got {names}")
    storage.makedirs(out, storage_options)
    jobs = [(spec, cfg, out, i, storage_options) for spec in cfg.datasets for i in range(spec.num_shards)]
    shards: dict[str, list[WrittenShard]] = {d.name: [] for d in cfg.datasets}
    truth: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(_iter_with_progress(pool.map(_write_shard, jobs), jobs, progress))
    else:
        results = list(_iter_with_progress(map(_write_shard, jobs), jobs, progress))
    for (spec, *_), (written, rows) in zip(jobs, results):
        shards[spec.name].append(written)
        truth.extend(rows)
    counts: dict[str, dict[str, int]] = {}
    for row in truth:
        c = counts.setdefault(row["dataset"], {})
        c[row["noise"]] = c.get(row["noise"], 0) + 1
    schema = pa.schema([("dataset", pa.string()), ("kind", pa.string()), ("shard", pa.string()), ("key", pa.string()),
                        ("noise", pa.string()), ("source_key", pa.string()), ("detail", pa.string())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(truth, schema=schema), buf)
    gt_url = storage.join(out, "ground_truth.parquet")
    storage.write_bytes(gt_url, buf.getvalue(), storage_options)
    result = SynthResult(out=out, shards=shards, ground_truth=gt_url, counts=counts)
    corpus = {"config": asdict(cfg), **result.summary(),
              "shards": {k: [s.to_dict() for s in v] for k, v in shards.items()}}
    storage.write_bytes(storage.join(out, "corpus.json"), json.dumps(corpus, indent=2).encode(), storage_options)
    return result


def _iter_with_progress(results: Any, jobs: list, progress: Callable[[str, int], None] | None) -> Iterator:
    for job, res in zip(jobs, results):
        if progress is not None:
            progress(job[0].name, res[0].nsamples)
        yield res


def load_ground_truth(out: str, storage_options: dict[str, Any] | None = None):
    """The ground truth table of a synthesized corpus, as a polars DataFrame."""
    import polars as pl

    return pl.read_parquet(io.BytesIO(storage.read_bytes(storage.join(out, "ground_truth.parquet"), storage_options)))
