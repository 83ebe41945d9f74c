"""Scoring at pool scale: planning from metadata, one read and one decode per pass, decode threads.

- The driver plans from listings (size and mtime): it reads no shard bytes (its own I/O
  counters, /proc/self/io), and the checksum in every score file is the one the worker computed
  as it read the shard.
- A fused pass of basic + clip + deltaloss decodes each image once (Pillow's decoder runs
  counted) and writes the same scores as each scorer alone.
- A shard rewritten in place under the same size and mtime is not rescored (metadata only), but
  resharding refuses it against the recorded checksum.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import xxhash

from curation.common.counters import count_decodes, read_bytes_so_far
from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from curation.data.shards import list_shards
from curation.data.writer import ShardWriter
from curation.scoring.engine import ScorerSpec, ShardTask, read_score_metadata, run_pass, score_file_url, score_local_pass
from scoring_fixture import tiny_models  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """24 pairs in 2 shards, a few with corrupt images (errors must come out the same fused)."""
    out = str(tmp_path_factory.mktemp("pass"))
    synthesize(out, SynthConfig(seed=5, datasets=[DatasetSpec("pairs", "pair", 24, {"corrupt_image": 0.1}, 12)]))
    return out


def _specs(models: dict, decode_workers: int = 1) -> list[ScorerSpec]:
    return [ScorerSpec("basic", batch_size=8, decode_workers=decode_workers),
            ScorerSpec("clip", {"model": models["clip"]}, batch_size=8, decode_workers=decode_workers),
            ScorerSpec("deltaloss", {"small": models["small"], "large": models["large"]}, batch_size=8,
                       decode_workers=decode_workers)]


def _tasks(corpus: str) -> list[ShardTask]:
    return [ShardTask(u, "pairs", "pair") for u in list_shards(f"{corpus}/pairs")]


def _table(work: str, scorer: str, url: str):
    t = pq.read_table(score_file_url(work, scorer, "pairs", os.path.basename(url)[:-4]))
    return t.drop_columns(["shard"]).sort_by("key").to_pylist()


def test_fused_pass_decodes_each_image_once_and_scores_as_alone(pairs, tiny_models, tmp_path):
    tasks = _tasks(pairs)
    with count_decodes() as decodes:
        reports = score_local_pass(tasks, _specs(tiny_models, decode_workers=2), str(tmp_path / "fused"))
    rows = sum(s.rows for s in reports[0].scored)
    assert rows == 24 and all(len(r.scored) == 2 and not r.failed for r in reports)
    assert decodes.n <= rows, f"{decodes.n} decodes for {rows} images"  # <= 1.0 per image (corrupt ones fail earlier)
    alone = str(tmp_path / "alone")
    with count_decodes() as separate:
        for spec in _specs(tiny_models):
            score_local_pass(tasks, [spec], alone)
    assert separate.n > decodes.n  # scored one at a time, each pass decodes again
    for name in ("basic", "clip", "deltaloss"):
        for t in tasks:
            fused, single = _table(str(tmp_path / "fused"), name, t.url), _table(alone, name, t.url)
            assert [r["error"] for r in fused] == [r["error"] for r in single]
            for a, b in zip(fused, single):
                for k, v in a.items():
                    assert v == pytest.approx(b[k], rel=1e-4, abs=1e-5) if isinstance(v, float) else v == b[k], (name, k)
    errors = [r for t in tasks for r in _table(alone, "clip", t.url) if r["error"]]
    assert errors and all("corrupt image" in r["error"] for r in errors)


def test_fused_pass_decodes_each_clip_once(tiny_models, tmp_path):
    """Clips: verification decodes each once and keeps its frames; basic (phash, motion), CLIP
    (its sampled frames) and DeltaLoss (NVILA's frames) use them, and score as from the clip's own bytes."""
    from curation.data.shards import read_shard
    from scorers.basic import BasicScorer

    out = str(tmp_path / "c")
    synthesize(out, SynthConfig(seed=2, datasets=[DatasetSpec("clips", "video", 6, {"corrupt_video": 0.2}, 6)]))
    tasks = [ShardTask(u, "clips", "video") for u in list_shards(f"{out}/clips")]
    with count_decodes() as decodes:  # basic + clip + deltaloss in one pass
        reports = score_local_pass(tasks, _specs(tiny_models), str(tmp_path / "w"))
    assert not any(r.failed for r in reports) and all(r.scored[0].rows == 6 for r in reports)
    assert decodes.videos == 6, f"{decodes.videos} clip decodes for 6 clips"  # corrupt ones too, once
    fused = pq.read_table(score_file_url(str(tmp_path / "w"), "basic", "clips", "00000")).to_pylist()
    own = BasicScorer().score(list(read_shard(tasks[0].url, kind="video")))  # frames decoded from the bytes
    assert [r["phash"] for r in fused] == own["phash"]
    assert [r["motion"] for r in fused] == [None if m is None else pytest.approx(m, rel=1e-6) for m in own["motion"]]
    assert sum(r["motion"] is not None for r in fused) >= 4


def test_score_files_carry_the_checksum_the_worker_hashed(pairs, tmp_path):
    tasks = _tasks(pairs)
    (report,) = score_local_pass(tasks, [ScorerSpec("basic")], str(tmp_path / "w"))
    for t in tasks:
        md = read_score_metadata(score_file_url(str(tmp_path / "w"), "basic", "pairs", os.path.basename(t.url)[:-4]))
        data = open(t.url, "rb").read()
        assert md["shard_checksum"] == "xxh128:" + xxhash.xxh3_128(data).hexdigest()
        st = os.stat(t.url)
        assert md["shard_bytes"] == str(st.st_size) and md["shard_version"].startswith(f"{st.st_size}:")


def test_in_place_rewrite_under_same_size_and_mtime_is_caught_by_reshard(pairs, tmp_path):
    import shutil

    from curation.selection.curate import curate
    from curation.selection.reshard import ReshardConfig, ReshardError

    corpus = tmp_path / "c" / "pairs"
    shutil.copytree(f"{pairs}/pairs", corpus)
    tasks = [ShardTask(u, "pairs", "pair") for u in list_shards(str(corpus))]
    work = str(tmp_path / "w")
    assert not score_local_pass(tasks, [ScorerSpec("basic")], work)[0].failed
    victim = tasks[0].url
    st = os.stat(victim)
    data = bytearray(open(victim, "rb").read())
    data[512 + 100] ^= 0xFF  # inside the first member's bytes
    open(victim, "wb").write(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the listing cannot tell
    (again,) = score_local_pass(tasks, [ScorerSpec("basic")], work)
    assert len(again.skipped) == 2 and not again.scored
    with pytest.raises(ReshardError, match="changed since it was scored"):
        curate(work, {"defaults": [{"rule": "valid", "min_size": 1}]}, str(tmp_path / "out"), ReshardConfig(max_samples=5), use_ray=False)
    os.utime(victim)  # a new mtime: the planner sees the change and scores it again
    (third,) = score_local_pass(tasks, [ScorerSpec("basic")], work)
    assert [r.url for r in third.scored] == [victim]


def _big_pool(out: str, shards: int = 4, per_shard: int = 12) -> int:
    """Pairs with 512x512 noise JPEGs (~0.3 MB each): a pool worth measuring 1 % of."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(out, exist_ok=True)
    with ShardWriter(out, max_samples=per_shard) as w:
        for i in range(shards * per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
            w.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": b"noise"})
    return sum(os.path.getsize(u) for u in list_shards(out))


def test_driver_reads_no_shard_bytes_and_actors_follow_gpus(tmp_path):
    import ray

    pool = _big_pool(str(tmp_path / "pool" / "pairs"))
    tasks = [ShardTask(u, "pairs", "pair") for u in list_shards(str(tmp_path / "pool" / "pairs"))]
    from curation.scoring.workers import gpu_workers

    # two GPUs declared to Ray (none needed: no actor here asks for one): a pass sizes its actors by them
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        assert (gpu_workers(8, 1.0), gpu_workers(8, 0.5), gpu_workers(1, 1.0), gpu_workers(3, 0.0)) == (2, 4, 1, 3)
        run_pass(tasks[:1], [ScorerSpec("basic")], str(tmp_path / "warm"))  # one-time: imports, Ray's first actor
        before = read_bytes_so_far()
        (report,) = run_pass(tasks, [ScorerSpec("basic", workers=2)], str(tmp_path / "w"))
        after = read_bytes_so_far()
    finally:
        ray.shutdown()
    assert len(report.scored) == len(tasks)
    read = after["rchar"] - before["rchar"]  # every read() of the driver: files, pipes, Ray's sockets
    assert read <= 0.01 * pool, f"driver read {read} bytes of a {pool}-byte pool"


def _pairs_in_formats() -> list:
    from PIL import Image

    from curation.data.samples import PairSample

    rng = np.random.default_rng(0)
    out = []
    for i, fmt in enumerate(["JPEG", "JPEG", "PNG", "JPEG"]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 90, 3), dtype=np.uint8)).save(buf, format=fmt)
        out.append(PairSample("d", "s", str(i), image=buf.getvalue(), caption="a red square"))
    out.append(PairSample("d", "s", "bad", image=b"\xff\xd8\xff" + b"not a jpeg", caption="x"))
    return out


def test_clip_device_decode_and_autocast_paths_run_on_the_cpu():
    """``decode: gpu`` (batched decode_jpeg, here on the CPU; PNG and corrupt bytes go to Pillow)
    and bf16 autocast give the CPU path's scores within their precision, under their own hash."""
    from scorers.clip import ClipScorer

    samples = _pairs_in_formats()
    scores, hashes = {}, {}
    for name, kw in (("cpu", {}), ("device_decode", {"decode": "gpu"}), ("bf16", {"precision": "bf16"})):
        sc = ClipScorer("tiny-clip", **kw)
        sc.setup()
        cols = sc.score(samples)
        scores[name], hashes[name] = cols["clip_score"], sc.config_hash()
        assert cols["clip_score"][-1] is None and cols["error"][-1].startswith("clip: cannot")
        assert all(e is None for e in cols["error"][:-1])
    assert len(set(hashes.values())) == 3
    assert ClipScorer("tiny-clip", precision="auto").config_hash() == hashes["cpu"]  # auto is fp32 on a CPU
    assert np.allclose(scores["device_decode"][:-1], scores["cpu"][:-1], atol=2e-3)
    assert np.allclose(scores["bf16"][:-1], scores["cpu"][:-1], atol=2e-2)
    with pytest.raises(ValueError, match="decode must be one of"):
        ClipScorer("tiny-clip", decode="nvjpeg")
