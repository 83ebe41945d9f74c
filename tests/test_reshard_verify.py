"""Resharding verifies what it copies and never writes what was refused on the way in.

Inputs are hashed as they are read (one pass per byte); a shard whose bytes changed since it
was scored is refused, naming it, and its group leaves nothing behind. Kept samples whose
members must never be written (``..`` or absolute paths, links) are left out and named, even
when the policy keeps samples with errors.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

import scorers
from scorers.basic import BasicScorer

from curation.data import storage
from curation.selection.curate import curate
from curation.scoring.engine import ScorerSpec, ShardTask, score_local
from curation.selection.manifest import summarize
from curation.selection.reshard import ReshardConfig, ReshardError
from curation.data.shards import checksum_algo, dataset_of, iter_raw_samples, list_shards
from curation.corpus.synth import DatasetSpec, Scene, SynthConfig, encode_image, render_scene, synthesize
from curation.data.tarstream import scan

KEEP_ALL = {"defaults": [{"rule": "valid", "min_size": 1}]}


def _score_basic(shard_dir: str, work: str) -> None:
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(shard_dir)]
    assert not score_local(tasks, ScorerSpec("basic"), work).failed


@pytest.fixture()
def scored_pairs(tmp_path):
    """Four shards of eight clean pairs, scored; reshard plans put shards 0-1 and 2-3 in two groups."""
    corpus, work = str(tmp_path / "corpus"), str(tmp_path / "work")
    synthesize(corpus, SynthConfig(seed=3, datasets=[DatasetSpec("pairs", "pair", 32, {}, 8)]))
    _score_basic(f"{corpus}/pairs", work)
    return corpus, work


def _files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("where", ["local", "ray", pytest.param("s3", marks=pytest.mark.s3)])
def test_changed_input_is_refused_by_name_and_its_group_leaves_nothing(scored_pairs, tmp_path, where, request):
    corpus, work = scored_pairs
    victim = list_shards(f"{corpus}/pairs")[3]  # the second input of group 1
    data = bytearray(open(victim, "rb").read())
    data[512 + 100] ^= 0xFF  # inside the first image's bytes: same size, still a valid tar, same keys
    open(victim, "wb").write(bytes(data))
    out = f"{request.getfixturevalue('s3_bucket')}/curated" if where == "s3" else str(tmp_path / "out")
    # 3 samples per shard: group 1 has written shards of its first input when it meets the victim
    cfg = ReshardConfig(max_samples=3, group_samples=16, workers=2)
    try:
        with pytest.raises(ReshardError, match=re.escape(victim) + r" \(pairs/00003\) changed since it was scored"):
            curate(work, KEEP_ALL, out, cfg, use_ray=where == "ray")
    finally:
        if where == "ray":
            import ray

            ray.shutdown()
    fs, root = storage.get_fs(out)
    names = sorted(os.path.relpath(p, root) for p in fs.find(root)) if fs.exists(root) else []
    assert not [n for n in names if "pairs-00001-" in n or "pairs-00001.json" in n]  # nothing of the refused group
    assert not [n for n in names if os.path.basename(n).startswith(".")]  # no temp file left behind
    assert "manifest.json" not in names and "pairs/index.wids.json" not in names
    # group 0 read only unchanged inputs: it is complete and correct, kept for the rerun
    group0 = [n for n in names if n.startswith("pairs/pairs-00000-") and n.endswith(".tar")]
    assert len(group0) == 6  # 16 samples, 3 per shard
    for n in group0:
        stats = json.loads(fs.cat(f"{root}/{n[:-4]}_stats.json"))
        assert hashlib.md5(fs.cat(f"{root}/{n}")).hexdigest() == stats["md5sum"]


def test_reshard_output_is_byte_exact_with_verification_in_the_pass(scored_pairs, tmp_path):
    """Every kept sample's members come out unchanged, the recorded md5 and size are the file's."""
    corpus, work = scored_pairs
    manifest, _ = curate(work, KEEP_ALL, str(tmp_path / "out"), ReshardConfig(max_samples=5, group_samples=10),
                         use_ray=False)
    inputs = {}
    for u in list_shards(f"{corpus}/pairs"):
        with open(u, "rb") as f:
            inputs.update({r.key: r.members for r in iter_raw_samples(f)})
    got = {}
    for s in manifest.outputs["pairs"].shards:
        raw = open(s.url, "rb").read()
        assert hashlib.md5(raw).hexdigest() == s.md5sum and len(raw) == s.filesize and len(raw) % 10240 == 0
        got.update({r.key: r.members for r in iter_raw_samples(io.BytesIO(raw))})
    assert got == inputs
    assert all(i.size == os.path.getsize(i.url) for i in manifest.inputs["pairs"])


def _hostile_shard(path: str) -> None:
    rng = np.random.default_rng(0)

    def jpg(shape: str) -> bytes:
        return encode_image(render_scene(Scene(shape, "red", "blue", "center"), 48, 40, rng), "jpg")

    members = [("good0.jpg", jpg("circle")), ("good0.txt", b"a red circle"),
               ("../evil.jpg", jpg("square")), ("../evil.txt", b"escapes the folder"),
               ("/abs/x.jpg", jpg("triangle")), ("/abs/x.txt", b"absolute"),
               ("bad.jpg", b"\x00\x01 not an image" * 20), ("bad.txt", b"corrupt but harmless"),
               ("link.txt", b"a link"), ("link.jpg", None),
               ("good1.jpg", jpg("star")), ("good1.txt", b"a red star")]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_unsafe_members_are_never_written_even_when_errors_are_kept(tmp_path):
    shard_dir, work, out = tmp_path / "hostile", str(tmp_path / "work"), str(tmp_path / "out")
    shard_dir.mkdir()
    _hostile_shard(str(shard_dir / "00000.tar"))
    _score_basic(str(shard_dir), work)
    policy = {"drop_errors": False, "defaults": [{"rule": "dedup", "column": "sha256"}]}
    manifest, _ = curate(work, policy, out, use_ray=False)
    assert manifest.selection["hostile"].kept == 6  # the policy keeps every sample, errors included
    refused = {r.key: r.reason for r in manifest.outputs["hostile"].refused}
    assert set(refused) == {"../evil", "/abs/x", "link"}
    assert "'..'" in refused["../evil"] and "absolute member path" in refused["/abs/x"]
    assert "links and devices" in refused["link"]
    written = [e.name for s in manifest.outputs["hostile"].shards for e in scan(open(s.url, "rb"))]
    assert written == ["good0.jpg", "good0.txt", "bad.jpg", "bad.txt", "good1.jpg", "good1.txt"]
    assert manifest.outputs["hostile"].samples == 3
    text = summarize(manifest)
    for key in refused:
        assert f"not written: hostile/00000 sample {key!r}" in text
    assert not [f for f in _files(out) if ".." in f or "passwd" in f]


@pytest.mark.parametrize("chunk", [700, 4096, 1 << 22])
def test_one_pass_scan_gives_each_member_its_raw_blocks_and_the_file_md5(tmp_path, chunk):
    """Long names (GNU and PAX headers before the member), a directory, members straddling read
    chunks: each sample's pieces are exactly its members' raw blocks, and the md5 is the file's."""
    from curation.selection.reshard_inputs import tar_samples
    from curation.selection.verified_copy import VerifiedInput

    path = str(tmp_path / "mixed.tar")
    rng = np.random.default_rng(1)
    long_dir = "d" * 120
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i, key in enumerate(["a/000", f"{long_dir}/001", "b/002", "b/003"]):
            if i == 2:
                d = tarfile.TarInfo("b")
                d.type = tarfile.DIRTYPE
                tf.addfile(d)
            for ext, size in (("jpg", int(rng.integers(1, 3000))), ("txt", 5), ("json", 0)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = size
                tf.addfile(info, io.BytesIO(rng.integers(0, 256, size, dtype=np.uint8).tobytes()))
    with open(path, "rb") as f:
        want: dict[str, bytes] = {}
        for e in scan(f):
            key = e.name.rsplit(".", 1)[0]
            want[key] = want.get(key, b"") + e.header + e.body
    with open(path, "rb", buffering=0) as f:
        src = VerifiedInput(f, chunk=chunk)
        got = {key: b"".join(bytes(memoryview(buf)[lo:hi]) for buf, lo, hi in pieces)
               for key, pieces, why in tar_samples(src)}
        size, md5 = src.finish()
        src.close()
    assert got == want and len(got) == 4
    assert (size, md5) == (os.path.getsize(path), hashlib.md5(open(path, "rb").read()).hexdigest())


def _record_as_earlier_versions_did(work: str, corpus: str, algo: str) -> None:
    """Rewrite the ``basic`` score files' shard checksums to what versions before XXH3-128
    recorded: ``blake3:<hex>``, ``sha256:<hex>`` before that, or earlier still the bare md5 (the
    file contents stay: only the footer metadata changes)."""
    import pyarrow.parquet as pq

    from curation.data.records import new_hash
    from curation.scoring.scorefile import META_PREFIX, score_file_url

    for u in list_shards(f"{corpus}/pairs"):
        path = score_file_url(work, "basic", "pairs", os.path.basename(u)[: -len(".tar")])
        table = pq.read_table(path)
        meta = dict(table.schema.metadata)
        assert meta[META_PREFIX + b"shard_checksum"].startswith(b"xxh128:")
        h = new_hash(algo)
        h.update(open(u, "rb").read())
        digest = h.hexdigest()
        meta[META_PREFIX + b"shard_checksum"] = (digest if algo == "md5" else f"{algo}:{digest}").encode()
        pq.write_table(table.replace_schema_metadata(meta), path)


class BasicAgain(BasicScorer):
    """A second scorer for the same shards (the basic one under another name)."""

    name = "basic_again"


@pytest.mark.parametrize("algo", ["md5", "sha256", "blake3"])
def test_scores_recorded_by_an_earlier_version_still_count(scored_pairs, tmp_path, monkeypatch, algo):
    """Inputs are checksummed with XXH3-128 now; a store an earlier version wrote (blake3, sha256,
    or md5 before that) is neither rescored nor refused, a changed input is still caught against
    the old checksum, and a second scorer scoring today (xxh128) does not conflict with it: the
    inputs are then verified with the cheaper xxh128."""
    corpus, work = scored_pairs
    _record_as_earlier_versions_did(work, corpus, algo)
    tasks = [ShardTask(u, "pairs") for u in list_shards(f"{corpus}/pairs")]
    report = score_local(tasks, ScorerSpec("basic"), work)
    assert len(report.skipped) == 4 and not report.scored  # the checksum on record matches: nothing rescored
    victim = list_shards(f"{corpus}/pairs")[1]
    original = open(victim, "rb").read()
    data = bytearray(original)
    data[512 + 100] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(ReshardError, match=re.escape(victim) + r" \(pairs/00001\) changed since it was scored"):
        curate(work, KEEP_ALL, str(tmp_path / "refused"), ReshardConfig(max_samples=5), use_ray=False)
    open(victim, "wb").write(original)
    old, _ = curate(work, KEEP_ALL, str(tmp_path / "old"), ReshardConfig(max_samples=5), use_ray=False)
    assert old.outputs["pairs"].samples == 32
    assert {checksum_algo(i.checksum) for i in old.inputs["pairs"]} == {algo}  # verified with the old hash
    monkeypatch.setitem(scorers._REGISTRY, "basic_again", f"{__name__}:BasicAgain")
    assert not score_local(tasks, ScorerSpec("basic_again"), work).failed  # records xxh128
    keep_all = {"defaults": [{"rule": "dedup", "column": "basic_sha256"}]}  # two scorers: name the column
    manifest, _ = curate(work, keep_all, str(tmp_path / "out"), ReshardConfig(max_samples=5), use_ray=False)
    assert manifest.outputs["pairs"].samples == 32
    assert {checksum_algo(i.checksum) for i in manifest.inputs["pairs"]} == {"xxh128"}
    open(victim, "wb").write(bytes(data))  # with two hashes on record, a changed byte is still caught
    with pytest.raises(ValueError, match=re.escape(victim) + " was scored in two versions"):
        curate(work, keep_all, str(tmp_path / "refused2"), ReshardConfig(max_samples=5), use_ray=False)


def _ustar(path: str, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _samples(scanner, path: str, chunk: int) -> tuple[list, tuple[int, str]]:
    from curation.selection.sample_spans import Span, span_samples
    from curation.selection.verified_copy import VerifiedInput

    with open(path, "rb", buffering=0) as f:
        src = VerifiedInput(f, chunk=chunk)
        items = [x for i in scanner(src) for x in ([(s.keys[0], s.pieces, None) for s in span_samples(i)]
                                                  if isinstance(i, Span) else [i])]
        got = [(key, b"".join(bytes(memoryview(b)[lo:hi]) for b, lo, hi in pieces), why) for key, pieces, why in items]
        digest = src.finish()
    return got, digest


@pytest.mark.parametrize("chunk", [700, 1 << 20])
def test_fast_path_gives_what_the_full_scanner_gives_or_hands_over(tmp_path, chunk):
    """On plain members (sizes around block edges, a '..' path, a key repeated apart) the fast path
    yields what the full scanner yields; on an extended header, a link, a directory, a damaged or
    a cut header it raises UnusualTar, and resharding then takes the full scanner."""
    from curation.selection.plain_tar import UnusualTar, plain_samples
    from curation.selection.reshard_inputs import tar_samples

    rng = np.random.default_rng(2)
    members = [(f"{k}.{ext}", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
               for k, sizes in (("a/0", (0, 1)), ("a/1", (511, 512)), ("../evil", (3,)), ("a/2", (513, 3000)))
               for ext, n in zip(("jpg", "txt"), sizes)] + [("a/0.json", b"{}")]
    plain = str(tmp_path / "plain.tar")
    _ustar(plain, members)
    want = _samples(tar_samples, plain, chunk)
    assert _samples(plain_samples, plain, chunk) == want and len(want[0]) == 4 and want[0][2][2]
    data = open(plain, "rb").read()
    unusual = {"pax": None, "link": None, "dir": None, "checksum": data[:148] + b"9" + data[149:],
               "cut": data[: 512 + 700]}
    for kind, content in unusual.items():
        path = str(tmp_path / f"{kind}.tar")
        if kind == "pax":
            _ustar(path, [("x" * 120 + "/0.jpg", b"1")], tarfile.PAX_FORMAT)
        elif kind in ("link", "dir"):
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
                info = tarfile.TarInfo("a/0.jpg")
                info.type = tarfile.SYMTYPE if kind == "link" else tarfile.DIRTYPE
                info.linkname = "/etc/passwd" if kind == "link" else ""
                tf.addfile(info)
        else:
            open(path, "wb").write(content)
        with pytest.raises(UnusualTar):
            _samples(plain_samples, path, chunk)


def test_fast_header_reading_agrees_with_the_exact_one():
    """The fast path's bulk reading of common headers (``common_headers``, every header of a buffer
    at once) gives what ``plain_member`` gives, or leaves the header to it: for every one-byte
    change of ustar and GNU headers, with and without its checksum fixed."""
    from curation.selection.plain_tar import common_headers, plain_member

    rng = np.random.default_rng(5)
    headers = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        for size in (0, 1, 511, 513, 8 ** 11 - 1):
            info = tarfile.TarInfo("dir/a.b.jpg")
            info.size = size
            header = info.tobuf(fmt)[:512]
            headers.append(header)
            for _ in range(200):
                changed = bytearray(header)
                at = int(rng.choice([0, 124, 134, 135, 148, 153, 154, 155, 156, 257, 345, int(rng.integers(512))]))
                changed[at] = int(rng.choice([0, 32, 43, 48, 55, 56, 57, 95, int(rng.integers(256))]))
                headers.append(bytes(changed))
                if not 148 <= at < 156:  # the same change with the checksum made to add up again
                    changed[148:156] = b" " * 8
                    changed[148:156] = b"%06o\0 " % sum(changed)
                    headers.append(bytes(changed))
    blocks = np.frombuffer(b"".join(headers), dtype=np.uint8).reshape(-1, 512)
    common, sizes = common_headers(blocks)
    assert common[0] and (blocks[0, :11].tobytes().decode(), int(sizes[0])) == plain_member(headers[0])
    for h, ok, size in zip(headers, common.tolist(), sizes.tolist()):
        if ok:
            assert (h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), size) == plain_member(h)
    assert 100 < common.sum() < len(headers)  # some changes leave a header the fast reading still takes


NAMES = ["a/0.jpg", "0.jpg", "a.b/c.d.jpg", "a.b/c", "a/.hidden", ".hidden.jpg", "a/b.", "x",
         "a/b/c.tar.gz", "a\nb.jpg", "a/b\n.jpg", "dir\n/x.jpg", "../evil.txt", "a//b.jpg", "a/b/.c.d", "é/ü.x.y",
         "a/b.jpg\n"]


def test_fast_key_split_agrees_with_the_readers():
    """The fast path's sample keys (``sample_key``, and ``bulk_keys`` where it is sure) are the shard
    reader's (``split_key``, the whole name when it has no key): dots in folders, hidden files,
    no extension, several dots, a newline."""
    from curation.data.shards import split_key
    from curation.selection.plain_tar import bulk_keys
    from curation.selection.reshard_inputs import sample_key

    rows = np.zeros((len(NAMES), 100), dtype=np.uint8)
    for i, name in enumerate(NAMES):
        raw = name.encode()
        rows[i, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    lengths = bulk_keys(rows).tolist()
    for name, n in zip(NAMES, lengths):
        parts = split_key(name)
        want = parts[0] if parts else name
        assert sample_key(name) == want, name
        assert n < 0 or name.encode()[:n].decode() == want, name
    assert sum(n >= 0 for n in lengths) >= 7  # the common names are split in bulk


def _odd_header(path: str, at: int, how: str) -> None:
    """Rewrite the header at byte ``at`` in a layout other than the common one that tarstream still
    reads the same (a size with leading spaces, a checksum with a leading space), checksum fixed."""
    data = bytearray(open(path, "rb").read())
    h = data[at:at + 512]
    if how == "size":
        size = int(bytes(h[124:135]), 8)
        h[124:136] = b"%11o " % size
    h[148:156] = b" " * 8
    h[148:156] = b" %06o\0" % sum(h) if how == "checksum" else b"%06o\0 " % sum(h)
    data[at:at + 512] = h
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("chunk", [700, 4096, 1 << 20])
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_bulk_fast_path_gives_what_the_full_scanner_gives_on_odd_names_and_layouts(tmp_path, chunk, fmt):
    """Names the bulk key split leaves to the exact one, a key coming back, refused names inside a
    sample, and headers in other layouts the exact reading takes, among common ones: the fast
    path's samples (and bytes) are the full scanner's."""
    from curation.selection.plain_tar import plain_samples
    from curation.selection.reshard_inputs import tar_samples

    rng = np.random.default_rng(fmt * 10 + chunk % 7)
    keys = [f"k/{i:03d}" for i in range(12)]
    members = []
    for i, key in enumerate(keys):
        for ext in ("jpg", "txt", "json")[: 1 + i % 3]:
            members.append((f"{key}.{ext}", rng.integers(0, 256, int(rng.integers(0, 1500)), dtype=np.uint8).tobytes()))
        if i == 4:
            members.append(("k/004/../x.txt", b"refused inside a sample"))
        if i in (2, 7):
            members.append((NAMES[int(rng.integers(len(NAMES)))], b"odd"))
    members.insert(9, ("k/000.again", b"a key that comes back is skipped"))
    path = str(tmp_path / "mixed.tar")
    _ustar(path, members, fmt)
    offsets = [e.offset for e in tarfile.open(path)]
    _odd_header(path, offsets[3], "size")
    _odd_header(path, offsets[10], "checksum")
    want = _samples(tar_samples, path, chunk)
    assert _samples(plain_samples, path, chunk) == want
    assert len(want[0]) >= 12 and any(why for _, _, why in want[0])
