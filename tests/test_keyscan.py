"""The media-free reader (``curation.data.keyscan.read_light``) sees every shard as the full reader
does: the same keys in the same order, the same captions, and tar damage on the same samples,
on good shards and on the fuzz cases of ``tests/tarfuzz.py`` (cuts, flips, garbage fields, PAX)."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import io
import tarfile
import uuid

import fsspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tarfuzz
from curation.data import tarindex
from curation.data.keyscan import read_light
from curation.data.shards import ShardError, list_shards, read_shard
from tarfuzz import GoodShard, _layout, damaged_gzips, damaged_tars, time_limit

FUZZ = settings(max_examples=250, deadline=timedelta(seconds=1), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TAR_DAMAGE = ("truncated", "corrupt tar", "corrupt compressed", "unsupported tar member", "duplicate member",
              "has no extension", "member path")


MEDIA = ("jpg", "png", "JPG", "seg.png")
_MEM = fsspec.filesystem("memory")


def _read(fn, url):
    try:
        return [(s.key, s.kind, getattr(s, "caption", None), s.error, s.members) for s in fn(url, kind="pair")], None
    except ShardError:
        return None, "ShardError"


def _same(url: str, full=None) -> None:
    full, full_err = full or _read(read_shard, url)
    light, light_err = _read(read_light, url)
    assert full_err == light_err
    if full is None:
        return
    assert [k for k, *_ in light] == [k for k, *_ in full]
    for (key, _, cap_f, err_f, mem_f), (_, _, cap_l, err_l, mem_l) in zip(full, light):
        damaged_full = err_f is not None and any(t in err_f for t in TAR_DAMAGE)
        damaged_light = err_l is not None and any(t in err_l for t in TAR_DAMAGE)
        assert damaged_full == damaged_light, (key, err_f, err_l)
        if not damaged_full and cap_f is not None:
            assert cap_l == cap_f
        if not damaged_full:  # every member but the media, byte for byte
            assert mem_l == {e: b for e, b in mem_f.items() if e not in MEDIA}, key


def _flat_shards() -> list[GoodShard]:
    """Shards of flat "key.ext" names as img2dataset and webdataset write them (the index's grouped
    path): a PAX header with only an mtime before every member (webdataset), and ustar headers;
    plus names the grouping must hand back to the loop (a key twice, an extension twice, no dot)."""
    rng = np.random.default_rng(3)
    samples = [[(f"{i:05d}.{e}", rng.bytes(int(rng.integers(0, 1500)))) for e in ("jpg", "txt", "json")]
               for i in range(6)]
    odd = samples[:2] + [[("00002.JPG", b"x" * 700), ("00002.seg.png", b"y"), ("00002.", b"e")],
                         [("007.txt", b"short key"), ("007.cls", b"1")], [("00000.txt", b"again")],
                         [("00009.txt", b"a"), ("00009.txt", b"b"), ("nodot", b"c")]]
    shards = []
    for label, fmt, members in (("pax", tarfile.PAX_FORMAT, samples), ("ustar", tarfile.USTAR_FORMAT, samples),
                                ("odd", tarfile.GNU_FORMAT, odd)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, payload in (m for sample in members for m in sample):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 1_700_000_000.25  # a float mtime: PAX writes it
                tf.addfile(info, io.BytesIO(payload))
        shards.append(GoodShard(label, buf.getvalue(), _layout(buf.getvalue())))
    return shards


FLAT = _flat_shards()


@st.composite
def damaged_flat_tars(draw):
    saved, tarfuzz.SHARDS = tarfuzz.SHARDS, FLAT
    try:
        return draw(damaged_tars())
    finally:
        tarfuzz.SHARDS = saved


@settings(FUZZ, max_examples=100)
@given(damaged_flat_tars())
def test_damaged_flat_tars_read_alike_locally_and_from_a_store(case):
    """The grouped path on good and damaged webdataset-style shards, from a local file (memory
    map) and from an object store read in windows small enough that members straddle them."""
    _, data, _ = case
    with time_limit(5), tempfile.TemporaryDirectory() as d:
        url = os.path.join(d, "00000.tar")
        with open(url, "wb") as f:
            f.write(data)
        full = _read(read_shard, url)
        _same(url, full)
        remote = f"memory://keyscan/{uuid.uuid4().hex}/00000.tar"
        _MEM.pipe(remote, data)
        saved, tarindex.WINDOW = tarindex.WINDOW, 2048
        try:
            _same(remote, full)
        finally:
            tarindex.WINDOW = saved
            _MEM.rm(remote)


def test_good_shards_read_alike(noisy_corpus):
    corpus, _ = noisy_corpus
    for ds in ("coyo_synth", "mmc4_synth", "video_synth"):
        for url in list_shards(f"{corpus}/{ds}"):
            full = list(read_shard(url))
            light = list(read_light(url))
            assert [(s.key, s.kind) for s in light] == [(s.key, s.kind) for s in full]
            assert all("jpg" not in s.members and "mp4" not in s.members for s in light)  # no media read
            for f, li in zip(full, light):
                if f.kind == "interleaved" and f.error is None:
                    assert li.text_list == f.text_list


def _check(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        url = os.path.join(d, "00000" + suffix)
        with open(url, "wb") as f:
            f.write(data)
        _same(url)


@FUZZ
@given(damaged_tars())
def test_damaged_tars_read_alike(case):
    _, data, _ = case
    with time_limit(5):
        _check(data, ".tar")


@settings(FUZZ, max_examples=100)
@given(damaged_gzips())
def test_damaged_gzips_read_alike(case):
    _, data, _ = case
    with time_limit(5):
        _check(data, ".tar.gz")
