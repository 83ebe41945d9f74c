"""The synthetic corpus: deterministic, in the real layouts, and its ground truth matches the shards."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import noisy_config
from curation.data.samples import InterleavedSample, PairSample, VideoSample
from curation.data.shards import list_shards, read_shard
from curation.corpus.synth import NOISE_TYPES, UNREADABLE_NOISE, DatasetSpec, SynthConfig, load_ground_truth, synthesize


def _read_all(out: str) -> dict[tuple[str, str], object]:
    samples = {}
    for ds in ("coyo_synth", "mmc4_synth", "video_synth"):
        for url in list_shards(f"{out}/{ds}"):
            for s in read_shard(url):
                assert (s.dataset, s.key) not in samples
                samples[(s.dataset, s.key)] = s
    return samples


def test_every_noise_type_is_injected(noisy_corpus):
    out, result = noisy_corpus
    gt = load_ground_truth(out)
    for ds, kind in (("coyo_synth", "pair"), ("mmc4_synth", "interleaved"), ("video_synth", "video")):
        noises = set(gt.filter(gt["dataset"] == ds)["noise"].to_list())
        assert set(NOISE_TYPES[kind]) | {"clean"} == noises, (ds, noises)


def _check_pair(s, r, noise, detail, samples):
    """A readable pair agrees with its ground truth: the caption, the image and the metadata."""
    cap = s.caption
    if noise == "empty_caption":
        assert cap == ""
    elif noise == "mismatched_caption":
        assert detail["shape"] not in cap and detail["color"] not in cap.split()[:6]
        assert detail["caption_describes"]["shape"] in cap
    elif noise == "gibberish_caption":
        assert not any(w in cap for w in ("circle", "square", "triangle", "background"))
    else:
        assert detail["shape"] in cap and detail["color"] in cap
    if noise == "tiny_image":
        assert max(s.width, s.height) < 16
    elif noise == "extreme_aspect":
        assert max(s.width, s.height) / min(s.width, s.height) > 10
    elif noise == "blank_image":
        arr = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"), dtype=np.float32)
        assert arr.std(axis=(0, 1)).max() < 3
    elif noise == "noise_image":
        arr = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"), dtype=np.float32)
        assert arr.std() > 50
    elif noise == "exact_duplicate":
        src = samples[(r["dataset"], r["source_key"])]
        assert s.image == src.image and s.caption == src.caption
    elif noise == "near_duplicate":
        src = samples[(r["dataset"], r["source_key"])]
        assert s.image != src.image and s.caption == src.caption
        assert abs(s.width / src.width - 1) < 0.2 and abs(s.height / src.height - 1) < 0.2
    # img2dataset metadata agrees with the member
    if noise not in UNREADABLE_NOISE:
        assert s.meta["sha256"] == hashlib.sha256(s.image).hexdigest()


def _check_document(s, noise, detail):
    """A readable MMC4 document: its distractors, its similarity matrix, where images sit."""
    names = [e["image_name"] for e in s.image_info]
    assert sorted(detail.get("distractors", [])) == sorted(n for n in names if n in detail.get("distractors", []))
    if noise == "distractor_images":
        assert detail["distractors"]
    sim = np.array(s.similarity_matrix)
    assert sim.shape == (len(s.image_info), len(s.text_list))
    if noise == "clean":
        # each image sits next to the sentence that describes it
        for e in s.image_info:
            assert "Here we drew" in s.text_list[e["matched_text_index"]]


def _check_video(s, noise, detail):
    if noise == "empty_caption":
        assert s.caption == ""
    elif noise == "mismatched_caption":
        assert detail["direction"] not in s.caption
    elif noise not in ("exact_duplicate",):
        assert detail["direction"] in s.caption
    assert s.num_frames == 6


def test_ground_truth_matches_what_the_reader_sees(noisy_corpus):
    out, _ = noisy_corpus
    gt = load_ground_truth(out)
    samples = _read_all(out)
    assert set(samples) == {(r["dataset"], r["key"]) for r in gt.iter_rows(named=True)}
    assert gt.height == len(samples)
    for r in gt.iter_rows(named=True):
        s = samples[(r["dataset"], r["key"])]
        noise = r["noise"]
        detail = json.loads(r["detail"])
        assert s.shard == r["shard"]
        unreadable = noise in UNREADABLE_NOISE or (r["kind"] == "interleaved" and noise == "corrupt_image")
        assert (s.error is not None) == unreadable, (r, s.error)
        if isinstance(s, PairSample) and s.ok:
            _check_pair(s, r, noise, detail, samples)
        if isinstance(s, InterleavedSample) and s.ok:
            _check_document(s, noise, detail)
        if isinstance(s, VideoSample) and s.ok:
            _check_video(s, noise, detail)



def test_static_video_does_not_move(noisy_corpus):
    import av

    out, _ = noisy_corpus
    gt = load_ground_truth(out)
    samples = _read_all(out)

    def motion(video: bytes) -> float:
        with av.open(io.BytesIO(video)) as c:
            frames = [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]
        return float(np.abs(frames[-1] - frames[0]).mean())

    rows = {r["noise"]: r for r in gt.filter(gt["dataset"] == "video_synth").iter_rows(named=True)}
    static = samples[("video_synth", rows["static_video"]["key"])]
    clean = samples[("video_synth", rows["clean"]["key"])]
    assert motion(static.video) < motion(clean.video) / 3


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = noisy_config(seed=3, pairs=10, docs=4, videos=3)
    a, b = synthesize(str(tmp_path / "a"), cfg), synthesize(str(tmp_path / "b"), cfg)
    c = synthesize(str(tmp_path / "c"), noisy_config(seed=4, pairs=10, docs=4, videos=3))
    md5 = lambda r: {k: [s.md5sum for s in v] for k, v in r.shards.items()}  # noqa: E731
    assert md5(a) == md5(b)
    assert md5(a)["coyo_synth"] != md5(c)["coyo_synth"]
    assert load_ground_truth(str(tmp_path / "a")).equals(load_ground_truth(str(tmp_path / "b")))


def test_sizes_and_parallel_generation_agree(tmp_path):
    cfg = SynthConfig.preset("tiny", seed=1)
    serial = synthesize(str(tmp_path / "s"), cfg)
    parallel = synthesize(str(tmp_path / "p"), cfg, workers=2)
    assert {k: [s.md5sum for s in v] for k, v in serial.shards.items()} == {k: [s.md5sum for s in v] for k, v in parallel.shards.items()}
    small = SynthConfig.preset("small")
    assert small.datasets[0].samples > cfg.datasets[0].samples
    assert SynthConfig.preset("1000").datasets[0].samples == 1000


def test_ground_truth_is_not_inside_shards(noisy_corpus):
    out, _ = noisy_corpus
    for url in list_shards(f"{out}/coyo_synth"):
        for s in read_shard(url):
            assert "noise" not in s.meta and set(s.members) <= {"jpg", "png", "webp", "txt", "json"}


def test_bad_synth_config_is_refused():
    with pytest.raises(ValueError, match="unknown noise type"):
        DatasetSpec("x", "pair", 10, {"bogus": 0.1})
    with pytest.raises(ValueError, match="sum to at most 1"):
        DatasetSpec("x", "pair", 10, {"noise_image": 0.7, "blank_image": 0.7})
    with pytest.raises(ValueError, match="unknown kind"):
        DatasetSpec("x", "audio", 10)
    with pytest.raises(ValueError, match="unknown size"):
        SynthConfig.preset("huge")


def test_video_encoding_is_bit_exact():
    from curation.corpus.synth import Scene, encode_mp4, render_clip

    frames = render_clip(Scene("circle", "red", "blue", "center"), "from left to right", 64, 8, np.random.default_rng(0))
    assert len({hashlib.md5(encode_mp4(frames, 8)).hexdigest() for _ in range(12)}) == 1
