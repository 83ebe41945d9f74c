"""Interoperability with the ecosystem's own readers and writers, locally and on S3."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import webdataset as wds

from curation.data import storage
from curation.data.compat import ray_read_webdataset, webdataset_reader
from curation.data.shards import list_shards, read_shard
from curation.corpus.synth import SynthConfig, load_ground_truth, synthesize


def test_reader_reads_shards_written_by_webdataset(tmp_path):
    import numpy as np

    from curation.corpus.synth import Scene, encode_image, render_scene

    rng = np.random.default_rng(0)
    path = str(tmp_path / "wds-000000.tar")
    expected = {}
    with wds.TarWriter(path) as sink:
        for i in range(5):
            img = encode_image(render_scene(Scene("circle", "red", "blue", "center"), 40, 40, rng), "jpg")
            sink.write({"__key__": f"sample{i:04d}", "jpg": img, "txt": f"a red circle {i}", "json": {"i": i}})
            expected[f"sample{i:04d}"] = (img, f"a red circle {i}", {"i": i})
    got = list(read_shard(path, kind="pair", dataset="webdataset-written"))
    assert [s.key for s in got] == sorted(expected)
    for s in got:
        img, txt, meta = expected[s.key]
        assert s.ok, s.error
        assert (s.image, s.caption, s.meta) == (img, txt, meta)
        assert s.dataset == "webdataset-written"


def _expected_counts(out: str) -> dict[str, int]:
    gt = load_ground_truth(out)
    return {ds: gt.filter(gt["dataset"] == ds).height for ds in gt["dataset"].unique().to_list()}


def _check_webdataset_and_ray(out: str) -> None:
    counts = _expected_counts(out)
    for ds, n in counts.items():
        urls = list_shards(storage.join(out, ds))
        assert urls, ds
        # webdataset's own reader (through the fsspec opener for s3://)
        keys = [s["__key__"] for s in webdataset_reader(urls)]
        assert len(keys) == n and len(set(keys)) == n, ds
        assert sum(1 for u in urls for _ in read_shard(u)) == n
    # ray.data's own reader; decoder=False keeps members as bytes (some images are corrupt on purpose)
    urls = list_shards([storage.join(out, ds) for ds in counts])
    dataset = ray_read_webdataset(urls)
    rows = dataset.select_columns(["__key__"]).take_all()
    assert len(rows) == sum(counts.values())


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    # started after the S3 endpoint so that Ray's worker processes inherit its
    # AWS_ENDPOINT_URL and credentials, as workers on a real cluster get them from their env
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_synth_cli_local_read_by_webdataset_and_ray(tmp_path, ray_local):
    out = str(tmp_path / "corpus")
    r = subprocess.run([sys.executable, "-m", "curation.app.cli", "synth", "--out", out, "--size", "tiny", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"coyo_synth"' in r.stdout
    _check_webdataset_and_ray(out)


@pytest.mark.s3
def test_synth_cli_to_s3_read_by_webdataset_and_ray(s3_bucket, ray_local):
    out = f"{s3_bucket}/corpus"
    r = subprocess.run([sys.executable, "-m", "curation.app.cli", "synth", "--out", out, "--size", "tiny"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "ground truth" in r.stdout
    # the pair datasets carry img2dataset's sidecar files on S3 too
    names = [storage.basename(u) for u in storage.list_files(f"{out}/coyo_synth")]
    assert "00000.tar" in names and "00000.parquet" in names and "00000_stats.json" in names
    _check_webdataset_and_ray(out)


@pytest.mark.s3
def test_synthesize_to_s3_matches_local_bytes(s3_bucket, tmp_path):
    cfg = SynthConfig.preset("tiny", seed=5)
    local = synthesize(str(tmp_path / "c"), cfg)
    remote = synthesize(f"{s3_bucket}/c", cfg)
    assert {k: [s.md5sum for s in v] for k, v in local.shards.items()} == {k: [s.md5sum for s in v] for k, v in remote.shards.items()}
    for a, b in zip(local.shards["video_synth"], remote.shards["video_synth"]):
        assert storage.read_bytes(a.url) == storage.read_bytes(b.url)
