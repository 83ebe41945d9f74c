"""Every kind of bad input yields a sample record with a clear error; the reader goes on."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from curation.data.shards import ShardError, count_samples, read_shard
from curation.corpus.synth import Scene, encode_image, encode_mp4, render_clip, render_scene

RNG = np.random.default_rng(0)
GOOD_JPG = encode_image(render_scene(Scene("circle", "red", "blue", "center"), 48, 40, RNG), "jpg")
GOOD_MP4 = encode_mp4(render_clip(Scene("square", "red", "black", "center"), "from left to right", 32, 4, RNG), 4)


def _bomb_png() -> bytes:
    # 20000 x 20000 single-bit image: a few KB on disk, 400 megapixels decoded
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def _make_tar(path: str, members: list[tuple[str, bytes]], symlink: str | None = None) -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            if symlink and name.startswith("before."):
                link = tarfile.TarInfo(symlink)
                link.type = tarfile.SYMTYPE
                link.linkname = "/etc/passwd"
                tf.addfile(link)
    return path


def _pair(key: str, img: bytes = GOOD_JPG, txt: bytes | None = b"a red circle", js: bytes | None = b"{}",
          ext: str = "jpg") -> list[tuple[str, bytes]]:
    m = [(f"{key}.{ext}", img)] if img is not None else []
    if txt is not None:
        m.append((f"{key}.txt", txt))
    if js is not None:
        m.append((f"{key}.json", js))
    return m


CASES = {
    # name: (members of the bad sample, kind, expected error fragment)
    "corrupt image": (_pair("bad", img=b"\x00\x01garbage" * 50), "pair", "corrupt image"),
    "truncated image": (_pair("bad", img=GOOD_JPG[: len(GOOD_JPG) // 2]), "pair", "truncated"),
    "missing caption": (_pair("bad", txt=None), "pair", "missing caption member"),
    "missing image": (_pair("bad", img=None), "pair", "missing image member"),
    "non-utf8 caption": (_pair("bad", txt=b"caf\xe9 \xff"), "pair", "not valid UTF-8"),
    "invalid json": (_pair("bad", js=b'{"key": '), "pair", "invalid JSON"),
    "decompression bomb": (_pair("bad", img=_bomb_png(), ext="png"), "pair", "pixel limit"),
    "dotdot member": ([("../bad.jpg", GOOD_JPG), ("../bad.txt", b"x")], "pair", "'..'"),
    "absolute member": ([("/abs/bad.jpg", GOOD_JPG), ("/abs/bad.txt", b"x")], "pair", "absolute member path"),
    "corrupt video": ([("bad.mp4", b"\x00" * 64 + GOOD_MP4[64:]), ("bad.txt", b"clip")], "video", "corrupt video"),
    "truncated video": ([("bad.mp4", GOOD_MP4[: len(GOOD_MP4) // 3]), ("bad.txt", b"clip")], "video", "corrupt video"),
    "missing mmc4 image": (
        [("bad.json", json.dumps({"url": "u", "text_list": ["a"], "image_info": [
            {"image_name": "x.jpg", "matched_text_index": 0}]}).encode())],
        "interleaved", "missing image member bad.x.jpg",
    ),
    "mmc4 json without text_list": ([("bad.json", b'{"url": "u"}')], "interleaved", "no 'text_list'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sample_is_reported_and_others_survive(tmp_path, case):
    members, kind, fragment = CASES[case]
    good_before = _pair("before") if kind == "pair" else [("before.mp4", GOOD_MP4), ("before.txt", b"c")] if kind == "video" else [
        ("before.json", json.dumps({"url": "u", "text_list": ["a"], "image_info": [{"image_name": "i.jpg", "matched_text_index": 0}]}).encode()),
        ("before.i.jpg", GOOD_JPG)]
    good_after = [(n.replace("before", "after", 1), d) for n, d in good_before]
    url = _make_tar(str(tmp_path / "00000.tar"), good_before + members + good_after)
    got = list(read_shard(url, kind=kind))
    assert len(got) == 3, [(s.key, s.error) for s in got]  # exactly one record per key
    before, bad, after = got
    assert before.ok and after.ok, (before.error, after.error)
    assert before.key == "before" and after.key == "after"
    assert bad.error and fragment in bad.error, bad.error
    assert count_samples(url) == 3
    # nothing was extracted anywhere a bad name points
    assert not (tmp_path.parent / "bad.jpg").exists() and not os.path.exists("/abs") and not (tmp_path / "bad.jpg").exists()


def test_symlink_member_is_refused(tmp_path):
    url = _make_tar(str(tmp_path / "s.tar"), _pair("before") + _pair("after"), symlink="before.png")
    got = {s.key: s for s in read_shard(url, kind="pair")}
    assert set(got) == {"before", "after"}
    assert "unsupported tar member type" in got["before"].error
    assert got["after"].ok


def test_truncated_tar_reports_interrupted_sample(tmp_path):
    members = [m for i in range(5) for m in _pair(f"s{i}")]
    full = _make_tar(str(tmp_path / "full.tar"), members)
    data = open(full, "rb").read()
    # cut in the middle of the 4th sample's image data
    with tarfile.open(full) as tf:
        m = [x for x in tf.getmembers() if x.name == "s3.jpg"][0]
    cut = str(tmp_path / "cut.tar")
    open(cut, "wb").write(data[: m.offset_data + 100])
    got = list(read_shard(cut, kind="pair"))
    assert [s.key for s in got] == ["s0", "s1", "s2", "s3"]
    assert all(s.ok for s in got[:3])
    assert "truncated" in got[3].error


def test_not_a_tar_or_empty_is_a_shard_error(tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(ShardError, match="junk.tar: .*checksum mismatch in the first header"):
        list(read_shard(str(p)))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"empty.tar: .*empty shard \(0 bytes\)"):
        list(read_shard(str(tmp_path / "empty.tar")))
    with pytest.raises(ShardError, match="empty shard"):
        count_samples(str(tmp_path / "empty.tar"))


def test_non_contiguous_key_keeps_one_record_per_key(tmp_path, caplog):
    url = _make_tar(str(tmp_path / "x.tar"), [("a.jpg", GOOD_JPG), ("b.jpg", GOOD_JPG), ("b.txt", b"b"), ("a.txt", b"a")])
    got = list(read_shard(url, kind="pair"))
    assert [s.key for s in got] == ["a", "b"]
    assert got[0].error == "missing caption member (.txt)" and got[1].ok
    assert "already appeared earlier" in caplog.text


@pytest.mark.parametrize("where", ["inside header", "at header boundary", "inside data"])
def test_truncated_tar_anywhere_is_reported(tmp_path, where):
    members = [m for i in range(5) for m in _pair(f"s{i}")]
    full = _make_tar(str(tmp_path / "full.tar"), members)
    data = open(full, "rb").read()
    with tarfile.open(full) as tf:
        m = [x for x in tf.getmembers() if x.name == "s3.jpg"][0]
    cut = {"inside header": m.offset + 200, "at header boundary": m.offset, "inside data": m.offset_data + 100}[where]
    path = str(tmp_path / "cut.tar")
    open(path, "wb").write(data[:cut])
    got = list(read_shard(path, kind="pair"))
    assert [s.key for s in got][:3] == ["s0", "s1", "s2"] and all(s.ok for s in got[:2])
    if where == "at header boundary":  # a tar that ends between members is complete as far as anyone can tell
        assert len(got) == 3 and got[2].ok, [(s.key, s.error) for s in got]
    else:
        assert any(s.error and "truncated" in s.error for s in got), [(s.key, s.error) for s in got]


def test_missing_shard_raises_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_shard(str(tmp_path / "missing.tar")))


def test_pixel_limit_is_configurable(tmp_path):
    url = _make_tar(str(tmp_path / "p.tar"), _pair("a"))
    assert next(read_shard(url, kind="pair")).ok
    s = next(read_shard(url, kind="pair", max_pixels=100))
    assert "100-pixel limit" in s.error


# --------------------------------------------------------------------------- malformed tar headers
# Each probe damages the middle sample of three: the first comes out intact, the damaged one
# carries an error naming its member and the bad field, and reading ends (it used to hang or
# raise a bare ValueError that lost the whole shard).


def _three(tmp_path, fmt=tarfile.PAX_FORMAT) -> tuple[bytes, list]:
    from tarfuzz import _layout

    path = str(tmp_path / "good.tar")
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in _pair("s0") + _pair("s1") + _pair("s2"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": name}
            tf.addfile(info, io.BytesIO(data))
    data = open(path, "rb").read()
    return data, _layout(data)


PAX_PROBES = {
    "length 0": (b"0 a=b\n", "length 0 is too short"),
    "negative length": (b"-5 a=b\n", "length b'-5' is not a number"),
    "non-numeric length": (b"abc path=x\n", "length b'abc' is not a number"),
    "length past the record": (b"99 a=b\n", "length 99 runs past the end"),
    "non-numeric size": (b"12 size=abc\n", "size record 'abc' is not a number"),
}


@pytest.mark.parametrize("probe", list(PAX_PROBES))
def test_malformed_pax_header_is_an_error_on_its_sample(tmp_path, probe):
    from tarfuzz import replace_pax, time_limit

    records, fragment = PAX_PROBES[probe]
    data, members = _three(tmp_path)
    victim = next(m for m in members if m.name == "s1.jpg")
    path = tmp_path / "00000.tar"
    path.write_bytes(replace_pax(data, victim, records))
    with time_limit(10):
        got = list(read_shard(str(path), kind="pair"))
    assert [s.key for s in got] == ["s0", "s1"]
    assert got[0].ok
    assert "'s1.jpg'" in got[1].error and fragment in got[1].error, got[1].error


HEADER_PROBES = {
    "non-octal size": (b"abc", "size field b'abc"),
    "negative base-256 size": (b"\xff" * 11 + b"\xfe", "negative size -2"),
    "bad base-256 lead byte": (b"\x81" + b"\0" * 11, "is not a valid base-256 number"),
}


@pytest.mark.parametrize("probe", list(HEADER_PROBES))
def test_malformed_size_field_is_an_error_on_its_sample(tmp_path, probe):
    from tarfuzz import replace_field, time_limit

    value, fragment = HEADER_PROBES[probe]
    data, members = _three(tmp_path, tarfile.GNU_FORMAT)
    victim = next(m for m in members if m.name == "s1.txt")
    path = tmp_path / "00000.tar"
    path.write_bytes(replace_field(data, victim.header, "size", value, fix_checksum=True))
    with time_limit(10):
        got = list(read_shard(str(path), kind="pair"))
    assert [s.key for s in got] == ["s0", "s1"] and got[0].ok
    assert "'s1.txt'" in got[1].error and fragment in got[1].error, got[1].error


def test_tar_without_end_blocks_keeps_its_last_sample(tmp_path):
    data, members = _three(tmp_path, tarfile.GNU_FORMAT)
    end = max(m.end for m in members)
    path = tmp_path / "00000.tar"
    for cut in (end, end + 200):  # no end-of-archive blocks; half of one
        path.write_bytes(data[:cut])
        got = list(read_shard(str(path), kind="pair"))
        assert [(s.key, s.error) for s in got] == [("s0", None), ("s1", None), ("s2", None)]


def test_truncated_tar_gz_keeps_samples_before_the_cut(tmp_path):
    import gzip

    from tarfuzz import gunzip_prefix

    data, members = _three(tmp_path, tarfile.GNU_FORMAT)
    victim = next(m for m in members if m.name == "s2.jpg")
    gz = gzip.compress(data, mtime=0)
    # a cut of the .gz whose data ends inside s2's image
    n = next(n for n in range(len(gz)) if victim.header + 512 < len(gunzip_prefix(gz[:n])) < victim.header + 812)
    path = tmp_path / "00000.tar.gz"
    path.write_bytes(gz[:n])
    got = list(read_shard(str(path), kind="pair"))
    assert [s.key for s in got] == ["s0", "s1", "s2"]
    assert got[0].ok and got[1].ok
    assert "truncated or corrupt compressed stream inside member 's2.jpg'" in got[2].error, got[2].error
