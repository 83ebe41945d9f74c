"""Runs of consecutive kept samples go to the writer as one byte range (a span) and come out as the
sample-by-sample path writes them: the same bytes, shards cut at the same samples, the same counts.

Edge cases covered: a span ending at a shard cut (by samples and by bytes), a sample larger than
a shard's byte limit, spans across read buffers, a sample going on from one batch of headers to
the next, the last sample of a tar, keys coming back and refused members among spans.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile

import numpy as np
import pytest

from curation.data.records import file_checksum
from curation.selection import reshard_inputs
from curation.selection.plain_tar import plain_samples
from curation.selection.reshard import Group, InputShard, ReshardConfig, _write_group
from curation.selection.sample_spans import Span, group_batches, group_samples, span_samples
from curation.selection.verified_copy import GroupWriter, VerifiedInput


def _flat(items) -> list[tuple[str, bytes, str | None]]:
    """(key, bytes, why) per sample, spans taken apart."""
    out = []
    for item in items:
        for key, pieces, why in ([(s.keys[0], s.pieces, None) for s in span_samples(item)]
                                 if isinstance(item, Span) else [item]):
            out.append((key, b"".join(bytes(memoryview(b)[lo:hi]) for b, lo, hi in pieces), why))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_grouping_by_batches_gives_the_samples_of_grouping_run_by_run(seed):
    """Random runs (keys going on across batches, coming back, refused) cut into random batches:
    ``group_batches`` gives ``group_samples``' samples, and spans where nothing needs a closer look."""
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(4000))
    runs, at, key, top, before = [], 0, 0, 0, 0
    while at < len(data) - 10:
        # go on, a new key, an earlier one coming back, the one before coming back
        key, before = rng.choice([key, top + 1, top + 1, top + 1, rng.randrange(top + 1), before]), key
        top = max(top, key)
        why = "refused" if rng.random() < 0.05 else None
        size = rng.randrange(1, 60)
        runs.append((f"k{key}", why, at, min(at + size, len(data))))
        at = runs[-1][3]

    def pieces(lo: int, hi: int):
        return [(data, lo, hi)]

    want = _flat(group_samples((k, why, pieces(lo, hi)) for k, why, lo, hi in runs))
    cuts = sorted(rng.sample(range(1, len(runs)), min(len(runs) - 1, rng.randrange(1, 12))))
    batches = [(runs[a:b], pieces) for a, b in zip([0] + cuts, cuts + [len(runs)])]
    got = list(group_batches(batches))
    assert _flat(got) == want


def _spans(sizes: list[int], per_span: int) -> tuple[list[Span], bytes]:
    """Samples of the given sizes in one buffer, as spans of ``per_span`` samples."""
    rng = np.random.default_rng(len(sizes))
    data = rng.integers(0, 256, sum(sizes), dtype=np.uint8).tobytes()
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    spans = []
    for a in range(0, len(sizes), per_span):
        b = min(a + per_span, len(sizes))
        spans.append(Span([f"{i:04d}" for i in range(a, b)], bounds[a:b + 1], [(data, bounds[a], bounds[b])]))
    return spans, data


@pytest.mark.parametrize("max_samples,max_bytes", [(7, 1 << 30), (1000, 6 * 10240), (4, 3 * 10240), (1, 1024)])
def test_a_span_is_written_as_its_samples_one_by_one(tmp_path, max_samples, max_bytes):
    """Shards cut at the same samples (by count, by bytes, a sample over the byte limit alone in
    its shard), with the same bytes, md5 and counts, whether samples come in spans or one by one."""
    sizes = [512 * n for n in [1, 2, 30, 1, 1, 4, 9, 1, 2, 2, 25, 3, 1, 1, 1, 7, 2, 1, 40, 1, 1, 2]]
    results = {}
    for per_span in (1, 5, len(sizes)):
        spans, _ = _spans(sizes, per_span)
        with GroupWriter(str(tmp_path / f"s{per_span}"), "part-{index:04d}.tar", max_samples, max_bytes) as w:
            for span in spans:
                w.write("in", span)
            written = w.commit()
        for s in written:
            assert hashlib.md5(open(s["url"], "rb").read()).hexdigest() == s["md5sum"]
        results[per_span] = [(s["nsamples"], s["filesize"], s["md5sum"], s["sources"]) for s in written]
    assert results[1] == results[5] == results[len(sizes)]
    assert sum(n for n, *_ in results[1]) == len(sizes) and len(results[1]) > 1


def _plain_tar(path: str, n: int) -> list[str]:
    rng = np.random.default_rng(n)
    keys = [f"s/{i:04d}" for i in range(n)]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key in keys:
            for ext, size in (("jpg", int(rng.integers(0, 3000))), ("txt", int(rng.integers(0, 40)))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = size
                tf.addfile(info, io.BytesIO(rng.integers(0, 256, size, dtype=np.uint8).tobytes()))
    return keys


@pytest.mark.parametrize("which", ["all", "every_other", "ends"])
def test_kept_runs_written_as_spans_match_the_full_scanner_sample_by_sample(tmp_path, monkeypatch, which):
    """A tar of 600 samples read in 4 kB buffers (spans across buffers and header batches), kept
    whole, every other sample, or all but its first and last: the fast path's spans give the
    bytes, shards and counts the full scanner gives sample by sample."""
    path = str(tmp_path / "in" / "00000.tar")
    (tmp_path / "in").mkdir()
    keys = _plain_tar(path, 600)
    kept = {"all": keys, "every_other": keys[::2], "ends": keys[1:-1]}[which]
    monkeypatch.setattr(reshard_inputs, "input_reader", lambda inp, f: VerifiedInput(f, chunk=4096, algo="xxh128"))
    with open(path, "rb", buffering=0) as f:
        spans = [i for i in plain_samples(VerifiedInput(f, chunk=4096)) if isinstance(i, Span)]
    assert max(len(s.keys) for s in spans) > 10 and max(len(s.pieces) for s in spans) > 2  # across buffers
    inp = InputShard("ds", "00000", path, file_checksum(path)[1], kept=kept)
    cfg = ReshardConfig(max_samples=97, max_bytes=200_000)
    out = {}
    for name, scanner in (("spans", plain_samples), ("one_by_one", reshard_inputs.tar_samples)):
        result = _write_group(Group("ds", 0, [inp]), str(tmp_path / name), cfg, None, scanner)
        assert result.copied == len(kept) and not result.refused
        out[name] = [(s["nsamples"], s["filesize"], s["md5sum"], s["sources"], open(s["url"], "rb").read())
                     for s in result.shards]
        stats = [json.loads(open(s["url"][:-4] + "_stats.json").read())["nsamples"] for s in result.shards]
        assert stats == [s["nsamples"] for s in result.shards]
    assert out["spans"] == out["one_by_one"]
    assert sum(s[0] for s in out["spans"]) == len(kept) and len(out["spans"]) > 2
    names = [m.name for s in out["spans"] for m in tarfile.open(fileobj=io.BytesIO(s[4]))]
    assert names[0] == f"{kept[0]}.jpg" and names[-1] == f"{kept[-1]}.txt" and len(names) == 2 * len(kept)
