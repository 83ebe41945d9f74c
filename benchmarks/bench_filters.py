"""Throughput of the media-free scorers, ``meta`` and ``text``, on COYO-style shards, per core.

Writes COYO-style shards as img2dataset lays them out: ``<shard>.tar`` (per sample a JPEG-sized
``.jpg`` payload, the caption ``.txt`` and the metadata ``.json``) and ``<shard>.parquet`` beside
it (one row per URL tried, ``status`` ``success`` for those in the tar, COYO's shipped score
columns). Then scores each shard in this process through the engine's own path
(``curation.scoring.scorefile.score_shard``: read, score, write the score file), as a Ray worker
does, and reports rows per wall second and per CPU second (one process, so CPU seconds are
the per-core figure). Sizes: --samples, e.g. 5000 10000 20000 (one shard each) for the curve.

    python benchmarks/bench_filters.py [--samples 5000 10000 20000] [--writer webdataset|plain] [--text] [--json out.json]

Target (issue 26): ``meta`` loads a COYO-style shard at >= 50k rows/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

COYO_COLUMNS = ["clip_similarity_vitb32", "clip_similarity_vitl14", "watermark_score", "aesthetic_score_laion_v2",
                "nsfw_score_opennsfw2", "nsfw_score_gantman"]
CAPTIONS = ["A Pomsky dog sitting in a field of orange flowers", "IMG_2044.JPG", "click here to download",
            "Photo de la plage au coucher du soleil", "Ein roter Bus fährt durch die Stadt", "sale sale sale sale",
            "Modern kitchen with white cabinets and a wooden island", "https://example.com/image/123.jpg"]


def _jpeg(rng: np.random.Generator, size: int = 48) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


class _PlainTar:
    """The project's own tar writer behind webdataset's TarWriter interface (ustar headers only)."""

    def __init__(self, path: str) -> None:
        from curation.data.writer import TarSink

        self.sink = TarSink(path)

    def write(self, sample: dict) -> None:
        self.sink.write(sample["__key__"], {k: v.encode() if isinstance(v, str) else v for k, v in sample.items()
                                            if k != "__key__"})

    def close(self) -> None:
        self.sink.close()


def make_coyo_shard(folder: str, name: str, samples: int, image_bytes: int = 12_000, failed: float = 0.05,
                    seed: int = 0, real_images: bool = False, writer: str = "webdataset") -> str:
    """A COYO-style ``<name>.tar`` with ``<name>.parquet`` beside it; returns the tar's path. About
    ``failed`` of the parquet's rows are URLs that failed to download (no sample in the tar).
    Images are ``image_bytes`` of noise named .jpg (never decoded by ``meta`` or ``text``), or
    small real JPEGs, one per sample, with ``real_images``. ``writer``: ``webdataset`` (img2dataset's
    TarWriter: a PAX header before every member) or ``plain`` (ustar headers only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import webdataset as wds

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    payload = rng.integers(0, 255, image_bytes, dtype=np.uint8).tobytes()
    u = {c: rng.random(samples) for c in COYO_COLUMNS}  # COYO-like ranges
    scores = {c: (0.1 + 0.35 * u[c] if c.startswith("clip") else 3 + 4 * u[c] if c.startswith("aesthetic")
                  else u[c] ** 3 if c.startswith("nsfw") else u[c]).astype(np.float32) for c in COYO_COLUMNS}
    rows: dict[str, list] = {"key": [], "status": [], "caption": [], "num_faces": [], **{c: [] for c in COYO_COLUMNS}}
    path = os.path.join(folder, f"{name}.tar")
    sink = wds.TarWriter(path) if writer == "webdataset" else _PlainTar(path)
    for i in range(samples):
        key = f"{name}{i:05d}"
        ok = rng.random() >= failed
        caption = CAPTIONS[i % len(CAPTIONS)]
        meta = {"key": key, "status": "success" if ok else "failed_to_download", "caption": caption,
                "num_faces": int(i % 3), **{c: float(scores[c][i]) for c in COYO_COLUMNS}}
        for k in rows:
            rows[k].append(meta[k])
        if ok:
            sink.write({"__key__": key, "jpg": _jpeg(rng) if real_images else payload, "txt": caption,
                        "json": json.dumps(meta, indent=4).encode()})
    sink.close()
    pq.write_table(pa.table(rows), os.path.join(folder, f"{name}.parquet"))
    return os.path.join(folder, f"{name}.tar")


def time_scorer(url: str, scorer_name: str, params: dict, out: str, batch_size: int = 1024, repeats: int = 3) -> dict:
    """Best of ``repeats`` (by CPU seconds: the machine may be shared) of scoring one shard, each
    with a new scorer (``meta`` keeps the last shard's parquet: a run reads it, as a worker does)."""
    from curation.scoring.scorefile import ShardTask, score_shard
    from scorers import build_scorer

    best = None
    for _ in range(repeats):
        scorer = build_scorer(scorer_name, **params)
        scorer.setup()
        t0, c0 = time.perf_counter(), time.process_time()
        result = score_shard(scorer, ShardTask(url, "coyo", "pair"), out, batch_size)
        run = (time.process_time() - c0, time.perf_counter() - t0)
        best = run if best is None or run < best else best
    cpu, wall = best
    return {"scorer": scorer_name, "params": params, "rows": result.rows, "errors": result.errors,
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rows_per_s": round(result.rows / wall),
            "rows_per_cpu_s": round(result.rows / cpu)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[5000, 10000, 20000])
    ap.add_argument("--image-kb", type=float, default=12.0)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per arm")
    ap.add_argument("--writer", choices=["webdataset", "plain"], default="webdataset",
                    help="webdataset: img2dataset's tars (a PAX header per member); plain: ustar headers only")
    ap.add_argument("--text", action="store_true", help="also time the text scorer (language ID + quality)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench_filters_")
    runs = []
    try:
        for n in args.samples:
            url = make_coyo_shard(os.path.join(root, "coyo"), f"s{n}", n, int(args.image_kb * 1000), writer=args.writer)
            arms = [("meta", {"preset": "coyo", "source": "parquet"}), ("meta", {"preset": "coyo", "source": "json"})]
            if args.text:
                arms.append(("text", {}))
            for name, params in arms:
                r = time_scorer(url, name, params, os.path.join(root, "work", f"{name}-{len(runs)}.parquet"),
                                repeats=args.repeats)
                r["samples"], r["shard_mb"] = n, round(os.path.getsize(url) / 1e6, 1)
                runs.append(r)
                print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sizes = [r["rows"] for r in runs if r["params"].get("source") == "parquet"]
    cpus = [r["cpu_s"] for r in runs if r["params"].get("source") == "parquet"]
    slope = float(np.polyfit(np.log(sizes), np.log(cpus), 1)[0]) if len(sizes) >= 2 else None
    report = {"benchmark": "bench_filters", "writer": args.writer, "runs": runs, "meta_parquet_cpu_growth_exponent": slope,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "note": "one process (the engine's score_shard, as in a Ray worker); rows_per_cpu_s is per core"}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
