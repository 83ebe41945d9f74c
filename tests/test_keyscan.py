"""The media-free reader (``curation.data.keyscan.read_light``) sees every shard as the full reader
does: the same keys in the same order, the same captions, and tar damage on the same samples,
on good shards and on the fuzz cases of ``tests/tarfuzz.py`` (cuts, flips, garbage fields, PAX)."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

from hypothesis import HealthCheck, given, settings

from curation.data.keyscan import read_light
from curation.data.shards import ShardError, list_shards, read_shard
from tarfuzz import damaged_gzips, damaged_tars, time_limit

FUZZ = settings(max_examples=250, deadline=timedelta(seconds=1), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TAR_DAMAGE = ("truncated", "corrupt tar", "corrupt compressed", "unsupported tar member", "duplicate member",
              "has no extension", "member path")


def _read(fn, url):
    try:
        return [(s.key, s.kind, getattr(s, "caption", None), s.error) for s in fn(url, kind="pair")], None
    except ShardError:
        return None, "ShardError"


def _same(url: str) -> None:
    full, full_err = _read(read_shard, url)
    light, light_err = _read(read_light, url)
    assert full_err == light_err
    if full is None:
        return
    assert [k for k, *_ in light] == [k for k, *_ in full]
    for (key, _, cap_f, err_f), (_, _, cap_l, err_l) in zip(full, light):
        damaged_full = err_f is not None and any(t in err_f for t in TAR_DAMAGE)
        damaged_light = err_l is not None and any(t in err_l for t in TAR_DAMAGE)
        assert damaged_full == damaged_light, (key, err_f, err_l)
        if not damaged_full and cap_f is not None:
            assert cap_l == cap_f


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
