"""Good shards and ways to damage them: the tar-scanner fuzz tests and ``benchmarks/fuzz_tar.py``.

A case is a good shard (GNU, PAX or ustar layout, plain or gzipped) plus one mutation: a
cut, byte flips, a header field replaced with garbage (its checksum fixed or not), or a PAX
header replaced with garbage records. :func:`check` reads the damaged shard with the real
reader and asserts what a user relies on: it ends, it raises nothing but
:class:`~curation.data.shards.ShardError` (and that only when no sample could be read), and every
sample whose blocks lie wholly before the first damaged byte comes out, in order, without
error except possibly the last of them (the damage may belong to it: a broken header
does not always say which member it was).
"""

from __future__ import annotations

import gzip
import io
import signal
import tarfile
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
from hypothesis import strategies as st
from PIL import Image

from curation.data.shards import ShardError, read_shard, split_key

FIELDS = {"name": (0, 100), "mode": (100, 108), "uid": (108, 116), "size": (124, 136), "mtime": (136, 148),
          "chksum": (148, 156), "typeflag": (156, 157), "magic": (257, 263), "prefix": (345, 500)}
NUMERIC_GARBAGE = [b"", b"abc", b"-1", b"+7", b"0x10", b"1_0", b" 9 ", b"8", b"77777777777", b"00000001000",
                   b"\x80" + b"\xff" * 11, b"\xff" * 12, b"\xff" * 11 + b"\xfe", b"\x81" + b"\0" * 11,
                   b"\x80" + b"\0" * 10 + b"\x05", b"\x80" + b"\0" * 5 + b"\x01" + b"\0" * 5, b"0" * 400]
PAX_GARBAGE = [b"0 a=b\n", b"-5 a=b\n", b"abc path=x\n", b"99 a=b\n", b"12 size=abc\n", b"11 size=-1\n",
               b"5 a\n", b"6 =b\n", b"9" * 30 + b" a=b\n", b"\n", b" ", b"00006 a=b", b"13 size=999\n",
               b"13 size=0x1\n", b"16 path=../x.jpg\n", b"9 path=\n", b"13 path=a b\n", b"\0\0\0"]
TYPEFLAGS = [b"0", b"\0", b"1", b"2", b"5", b"7", b"g", b"x", b"L", b"K", b"S", b"V", b"\xff"]


@dataclass
class Member:
    name: str
    start: int  # first block: its extended headers, if any, else its own header
    header: int  # its own header block
    pax: int | None  # its PAX header block, if any
    end: int  # end of its data, padded to a block


class GoodShard:
    """A good shard and where each of its members lies (not a dataclass: hypothesis would print its bytes)."""

    def __init__(self, label: str, data: bytes, members: list[Member]) -> None:
        self.label, self.data, self.members = label, data, members

    def __repr__(self) -> str:  # hypothesis prints failing cases: keep them short
        return f"GoodShard({self.label!r}, {len(self.data)} bytes)"

    def complete_before(self, damage: int) -> list[str]:
        """Keys, in tar order, whose members all end at or before byte ``damage``."""
        ends: dict[str, int] = {}
        for m in self.members:
            key = split_key(m.name)[0]
            ends[key] = max(ends.get(key, 0), m.end)
        return [k for k, e in ends.items() if e <= damage]


def _png(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _layout(data: bytes) -> list[Member]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for ti in tf.getmembers():
            header = ti.offset_data - 512
            pax = ti.offset if ti.offset != header and data[ti.offset + 156:ti.offset + 157] == b"x" else None
            out.append(Member(ti.name, ti.offset, header, pax, ti.offset_data + (ti.size + 511) // 512 * 512))
    return out


def build_shards(samples: int = 5, seed: int = 0) -> list[GoodShard]:
    """The same samples in three tar layouts: GNU long names, PAX headers, ustar prefixes."""
    rng = np.random.default_rng(seed)
    members = []
    for i in range(samples):
        key = f"{i:04d}" if i != 2 else "sub/" + "d" * 110 + "/0002"  # one name above 100 bytes
        members += [(f"{key}.png", _png(rng, 8 + 4 * i)), (f"{key}.txt", f"caption {i} é".encode()),
                    (f"{key}.json", b'{"i": %d, "pad": "%s"}' % (i, b"x" * (100 * i)))]
    shards = []
    for label, fmt in (("gnu", tarfile.GNU_FORMAT), ("pax", tarfile.PAX_FORMAT), ("ustar", tarfile.USTAR_FORMAT)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 1_700_000_000
                if fmt == tarfile.PAX_FORMAT:
                    info.pax_headers = {"comment": f"member {name}"}
                tf.addfile(info, io.BytesIO(payload))
        data = buf.getvalue()
        shards.append(GoodShard(label, data, _layout(data)))
    return shards


# --------------------------------------------------------------------------- mutations


def _fix_checksum(data: bytearray, header: int) -> None:
    block = bytes(data[header:header + 148]) + b" " * 8 + bytes(data[header + 156:header + 512])
    data[header + 148:header + 156] = b"%06o\0 " % sum(block)


def replace_field(data: bytes, header: int, field: str, value: bytes, fix_checksum: bool) -> bytes:
    lo, hi = FIELDS[field]
    out = bytearray(data)
    out[header + lo:header + hi] = value[: hi - lo].ljust(hi - lo, b"\0")
    if fix_checksum and field != "chksum":
        _fix_checksum(out, header)
    return bytes(out)


def replace_pax(data: bytes, member: Member, records: bytes) -> bytes:
    """The member's PAX header rebuilt around ``records`` (size and checksum made consistent)."""
    assert member.pax is not None
    block = bytearray(data[member.pax:member.pax + 512])
    block[124:136] = b"%011o\0" % len(records)
    _fix_checksum(block, 0)
    body = records + b"\0" * (-len(records) % 512)
    return data[:member.pax] + bytes(block) + body + data[member.header:]


def flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, xor in flips:
        out[pos % len(out)] ^= xor
    return bytes(out)


def damage_offset(good: bytes, damaged: bytes) -> int:
    """The first byte where ``damaged`` differs from ``good`` (its length if it is a prefix)."""
    n = min(len(good), len(damaged))
    diff = np.flatnonzero(np.frombuffer(good[:n], np.uint8) != np.frombuffer(damaged[:n], np.uint8))
    return int(diff[0]) if len(diff) else n


def gunzip_prefix(data: bytes) -> bytes:
    """What a cut gzip stream decompresses to before it ends."""
    d = zlib.decompressobj(wbits=31)
    try:
        return d.decompress(data) + d.flush()
    except zlib.error:
        return b""


# --------------------------------------------------------------------------- strategies

SHARDS = build_shards()
_GZIPPED = {s.label: gzip.compress(s.data, mtime=0) for s in SHARDS}


class Damaged(bytes):
    """Damaged shard bytes that print as their length and a head (hypothesis shows failing cases)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {bytes(self[:24])!r}...>"


@st.composite
def damaged_tars(draw: st.DrawFn) -> tuple[GoodShard, bytes, str]:
    """(good shard, damaged tar bytes, what was done)."""
    good = draw(st.sampled_from(SHARDS))
    kind = draw(st.sampled_from(["cut", "flip", "field", "field", "pax"] if good.label == "pax" else
                                ["cut", "flip", "field", "field"]))
    data = good.data
    if kind == "cut":
        pos = draw(st.integers(0, len(data)))
        return good, Damaged(data[:pos]), f"cut at {pos}"
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=4))
        return good, Damaged(flip(data, flips)), f"flip {flips}"
    if kind == "field":
        m = draw(st.sampled_from(good.members))
        header = draw(st.sampled_from([h for h in (m.header, m.start, m.pax) if h is not None]))
        field = draw(st.sampled_from(list(FIELDS)))
        value = draw(st.one_of(st.sampled_from(TYPEFLAGS if field == "typeflag" else NUMERIC_GARBAGE),
                               st.binary(max_size=FIELDS[field][1] - FIELDS[field][0])))
        fix = draw(st.booleans())
        return good, Damaged(replace_field(data, header, field, value, fix)), f"{field}={value!r} at {header} fix={fix}"
    m = draw(st.sampled_from([m for m in good.members if m.pax is not None]))
    records = draw(st.lists(st.one_of(st.sampled_from(PAX_GARBAGE), st.binary(max_size=40)), min_size=1, max_size=4))
    return good, Damaged(replace_pax(data, m, b"".join(records))), f"pax of {m.name!r} = {records!r}"


@st.composite
def damaged_gzips(draw: st.DrawFn) -> tuple[GoodShard, bytes, str]:
    """(good shard, damaged .tar.gz bytes, what was done): cuts and flips of the compressed stream."""
    good = draw(st.sampled_from(SHARDS))
    gz = _GZIPPED[good.label]
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(gz)))
        return good, Damaged(gz[:pos]), "gzip cut"
    flips = draw(st.lists(st.tuples(st.integers(0, len(gz) - 1), st.integers(1, 255)), min_size=1, max_size=2))
    return good, Damaged(flip(gz, flips)), "gzip flip"


# --------------------------------------------------------------------------- the property


class CaseTimeout(Exception):
    """A case ran past its time limit: the reader did not end."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt a Python loop that runs past ``seconds`` (SIGALRM: main thread only)."""
    def _raise(signum, frame):
        raise CaseTimeout(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_MEM = fsspec.filesystem("memory")


def read_damaged(data: bytes, gz: bool) -> tuple[list, ShardError | None]:
    """Every sample the reader yields for ``data``, and the ShardError it ended with, if any."""
    url = f"memory://tarfuzz/{uuid.uuid4().hex}/00000.tar" + (".gz" if gz else "")
    _MEM.pipe(url, data)
    samples = []
    try:
        for s in read_shard(url, kind="pair"):
            samples.append(s)
        return samples, None
    except ShardError as e:
        return samples, e
    finally:
        _MEM.rm(url)


def check(good: GoodShard, data: bytes, how: str = "") -> str:
    """Assert the reader's promises on one damaged shard (see the module docstring); say how it ended.

    A flipped gzip stream is only held to the first three: zlib drops the output of the
    chunk a corrupt block is in, so which bytes before the damage reach the reader is zlib's
    business, not the reader's.
    """
    gz = how.startswith("gzip")
    tar = gunzip_prefix(data) if how == "gzip cut" else data
    expected = [] if how == "gzip flip" else good.complete_before(damage_offset(good.data, tar))
    samples, err = read_damaged(data, gz)
    keys = [s.key for s in samples]
    assert keys[: len(expected)] == expected, (keys, expected)
    for s in samples[: max(0, len(expected) - 1)]:
        assert s.error is None, (s.key, s.error)
    assert all(k for k in keys), keys  # never a sample without a key
    assert len(keys) == len(set(keys)), keys  # one record per key
    if err is not None:
        assert not samples and "shard" in str(err), (keys, err)
        return "shard error"
    return "tar error on a sample" if any(s.error and "corrupt tar" in s.error for s in samples) else "read to the end"
