"""Write samples of each kind with our writer, read them back with our reader: local and S3."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from curation.data import storage
from curation.data.samples import InterleavedSample, PairSample, VideoSample
from curation.data.shards import list_shards, read_shard, shard_info
from curation.corpus.synth import Scene, encode_image, encode_mp4, render_clip, render_scene
from curation.data.writer import ShardWriter


def _pairs(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sc = Scene("circle", "red", "blue", "center")
        img = encode_image(render_scene(sc, 40 + i, 30 + i, rng), "png" if i % 2 else "jpg")
        out.append({"__key__": f"{i:06d}", "png" if i % 2 else "jpg": img, "txt": f"caption {i} é",
                    "json": json.dumps({"key": f"{i:06d}", "caption": f"caption {i} é"}).encode()})
    return out


def _docs(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        imgs = {f"img{j}.jpg": encode_image(render_scene(Scene("square", "green", "white", "center"), 32, 32, rng), "jpg")
                for j in range(2)}
        doc = {
            "url": f"https://x/{i}",
            "text_list": ["first sentence.", "a green square.", "another green square."],
            "image_info": [{"image_name": name, "raw_url": f"https://x/{name}", "matched_text_index": j + 1,
                            "matched_sim": 0.3} for j, name in enumerate(imgs)],
            "similarity_matrix": [[0.1, 0.3, 0.2], [0.1, 0.2, 0.3]],
        }
        out.append({"__key__": f"doc{i:04d}", "json": json.dumps(doc).encode(), **imgs})
    return out


def _videos(n: int) -> list[dict]:
    rng = np.random.default_rng(2)
    out = []
    for i in range(n):
        frames = render_clip(Scene("star", "yellow", "black", "center"), "from left to right", 32, 5, rng)
        out.append({"__key__": f"v{i:05d}", "mp4": encode_mp4(frames, 5), "txt": "a yellow star moves",
                    "json": json.dumps({"key": f"v{i:05d}"}).encode()})
    return out


def _write(base: str, dataset: str, samples: list[dict], **kw) -> list[str]:
    with ShardWriter(storage.join(base, dataset), **kw) as w:
        for s in samples:
            w.write(s)
    return [s.url for s in w.written]


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_pair_roundtrip(base):
    samples = _pairs(7)
    urls = _write(base, "coyo", samples, max_samples=3)
    assert len(urls) == 3  # 3 + 3 + 1
    assert list_shards(storage.join(base, "coyo")) == urls
    got = [s for u in urls for s in read_shard(u, kind="pair")]
    assert [s.key for s in got] == [s["__key__"] for s in samples]
    for s, ref in zip(got, samples):
        assert isinstance(s, PairSample) and s.ok, s.error
        assert s.dataset == "coyo" and s.identity == ("coyo", s.shard, ref["__key__"])
        ext = "png" if "png" in ref else "jpg"
        assert s.image == ref[ext] and s.image_ext == ext
        assert s.caption == ref["txt"]
        assert s.meta["caption"] == ref["txt"]
        assert (s.width, s.height) == Image.open(io.BytesIO(ref[ext])).size
        # members keep tar order and bytes, for byte-exact resharding later
        assert list(s.members) == [k for k in ref if k != "__key__"]


def test_interleaved_roundtrip(base):
    samples = _docs(4)
    urls = _write(base, "mmc4", samples, max_samples=10)
    got = list(read_shard(urls[0], kind="interleaved"))
    assert len(got) == 4
    for s, ref in zip(got, samples):
        assert isinstance(s, InterleavedSample) and s.ok, s.error
        doc = json.loads(ref["json"])
        assert s.text_list == doc["text_list"]
        assert [e["image_name"] for e in s.image_info] == ["img0.jpg", "img1.jpg"]
        assert s.images == {k: v for k, v in ref.items() if k.endswith(".jpg")}
        assert s.similarity_matrix == doc["similarity_matrix"]
        assert s.image_sizes == [(32, 32), (32, 32)]


def test_video_roundtrip(base):
    samples = _videos(3)
    urls = _write(base, "clips", samples)
    got = list(read_shard(urls[0], kind="video"))
    assert [s.key for s in got] == ["v00000", "v00001", "v00002"]
    for s, ref in zip(got, samples):
        assert isinstance(s, VideoSample) and s.ok, s.error
        assert s.video == ref["mp4"] and s.caption == "a yellow star moves"
        assert (s.width, s.height, s.num_frames) == (32, 32, 5)


def test_auto_kind_detection(tmp_path):
    url = _write(str(tmp_path), "mixed", _pairs(1) + _docs(1) + _videos(1))[0]
    assert [s.kind for s in read_shard(url)] == ["pair", "interleaved", "video"]


def test_writer_byte_limit_and_determinism(tmp_path):
    samples = _pairs(10)
    a = _write(str(tmp_path / "a"), "ds", samples, max_samples=1000, max_bytes=8 * 1024)
    b = _write(str(tmp_path / "b"), "ds", samples, max_samples=1000, max_bytes=8 * 1024)
    assert len(a) > 1
    for u in a:
        # every shard respects the limit (tar end blocks and padding included) unless one sample alone exceeds it
        with tarfile.open(u) as tf:
            n = len({m.name.split(".")[0] for m in tf.getmembers()})
        assert n == 1 or storage.get_fs(u)[0].size(u) <= 8 * 1024
    assert [storage.read_bytes(x) for x in a] == [storage.read_bytes(x) for x in b]
    assert sum(1 for u in a for _ in read_shard(u)) == 10


def test_writer_leaves_nothing_on_failure(tmp_path):
    out = str(tmp_path / "ds")
    with pytest.raises(TypeError):
        with ShardWriter(out) as w:
            w.write(_pairs(1)[0])
            w.write({"__key__": "bad", "txt": 123})  # not bytes/str
    assert storage.list_files(out) == []  # no half-written shard under a final name
    assert [p.name for p in (tmp_path / "ds").iterdir()] == []


def test_shard_info_reads_img2dataset_sidecars(tmp_path):
    from curation.corpus.synth import SynthConfig, synthesize

    synthesize(str(tmp_path), SynthConfig.preset("tiny"))
    url = list_shards(str(tmp_path / "coyo_synth"))[0]
    info = shard_info(url)
    assert info.dataset == "coyo_synth" and info.name == "00000"
    assert info.stats["successes"] == info.stats["count"] > 0
    import pyarrow.parquet as pq

    table = pq.read_table(info.parquet)
    assert table.num_rows == info.stats["count"]
    assert set(table.column("key").to_pylist()) == {s.key for s in read_shard(url)}


def test_list_shards_patterns(tmp_path):
    urls = _write(str(tmp_path), "ds", _pairs(6), max_samples=2)
    assert list_shards(str(tmp_path / "ds" / "{00000..00002}.tar")) == urls
    assert list_shards(str(tmp_path / "ds" / "*.tar")) == urls
    assert list_shards([urls[2], urls[0]]) == [urls[0], urls[2]]
    with pytest.raises(FileNotFoundError, match="no such shard"):
        list_shards(str(tmp_path / "nope"))
