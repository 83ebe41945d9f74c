"""Samples without their media: keys, captions and small members, for scorers that decode nothing.

A scorer that needs no pixels (``meta`` imports shipped metadata, ``text`` reads captions) says
so with ``needs_media = False``; the engine then reads its shards with :func:`read_light`
instead of :func:`curation.data.shards.read_shard`. The tar's headers are parsed exactly as
:mod:`curation.data.tarstream` parses them (checksums, GNU long names, PAX), but the bodies of
media members (images, videos) are seeked past, not read, and nothing is decoded: a shard of
images costs little more than its headers and its text members.

Each key still becomes exactly one sample, of the shard's kind, with its non-media members as
bytes (``members``) and, for pairs and clips, its ``caption`` from the ``.txt`` member. Tar damage
is reported on the sample it hits, as :func:`curation.data.records.iter_raw_samples` does; what
only decoding could find (a corrupt image) is not this reader's to report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
from functools import lru_cache
from typing import Any, Iterator

from curation.data import storage
from curation.data import tarstream as ts
from curation.data.records import ShardError, dataset_of, open_shard, shard_name, split_key, unsafe_name
from curation.data.samples import IMAGE_EXTS, SAMPLE_CLASSES, VIDEO_EXTS, Sample

log = logging.getLogger(__name__)

MEDIA_EXTS = frozenset(IMAGE_EXTS + VIDEO_EXTS + ("gif", "bmp", "tif", "tiff"))
MAX_TEXT_MEMBER = 64 << 20  # a non-media member larger than this is skipped and reported


class _SeekingStream(ts._Stream):
    """tarstream's reader, but a body nobody reads is seeked past when the file can seek."""

    def skip(self, n: int, member: str) -> None:
        if n and getattr(self.f, "seekable", lambda: False)():
            try:
                self.f.seek(n - 1, 1)  # the last byte is read: a stream cut inside the member is still caught
            except ts._STREAM_ERRORS as e:  # a gzipped shard seeks by decompressing
                raise ts.TarFormatError(f"truncated or corrupt compressed stream inside member {member!r}: {e}",
                                        member) from None
            self.offset += n - 1
            if not self.read(1, member):
                raise ts.TarFormatError(f"truncated tar: ends inside member {member!r}", member)
            return
        super().skip(n, member)


@lru_cache(maxsize=256)
def _is_media(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in MEDIA_EXTS


def _members(f: Any) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, body or None when skipped, error) per regular member; a last ("", None, error) when
    the tar breaks (tarstream's rules for what counts as broken)."""
    s = _SeekingStream(f)
    pending = ts._Pending([])
    try:
        while True:
            header = ts._read_header(s, pending)
            if header is None:
                return
            typeflag = header[156:157]
            if typeflag in ts.EXTENDED:
                ts._read_extended(s, header, typeflag, ts._size_field(header, pending.name("") or None), pending)
                continue
            name = pending.name(ts._header_name(header))
            if pending.error:
                raise ts.TarFormatError(f"corrupt tar header of member {name!r}: {pending.error}", name)
            size = ts._member_size(header, name, pending)
            if pending.blocks or pending.pax or pending.long_name:
                pending = ts._Pending([])
            if typeflag in ts.NO_DATA:
                yield name, None, f"unsupported tar member type for {name!r} (links and devices are refused)"
                continue
            ext = name.rpartition("/")[2].partition(".")[2]
            if typeflag == b"5" or typeflag not in ts.REGULAR or _is_media(ext) or size > MAX_TEXT_MEMBER:
                s.skip(ts._padded(size), name)
                if typeflag == b"5":
                    continue
                error = None if _is_media(ext) and typeflag in ts.REGULAR else (
                    f"member {name!r} is {size} bytes, above the {MAX_TEXT_MEMBER}-byte limit"
                    if typeflag in ts.REGULAR else f"unsupported tar member type for {name!r}")
                yield name, None, error
                continue
            yield name, s.exact(ts._padded(size), name)[:size], None
    except ts.TarFormatError as err:
        yield err.member or "", None, f"truncated or corrupt tar: {err}"


def _fast_members(path: str) -> list[tuple[str, bytes | None, str | None]] | None:
    """The members of a local, uncompressed tar of plain ustar/GNU headers (what img2dataset and
    webdataset write), from a memory map: header fields parsed as tarstream parses them, header
    checksums verified all at once with numpy. None when anything else is met (an extended header,
    a link, a checksum that does not add up, a cut): :func:`_members` then reads the shard."""
    import mmap

    import numpy as np

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < ts.BLOCK:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _walk(mm, size, np)


# name, size, typeflag and the first byte of the ustar prefix of a header block, in one call
_HEAD = struct.Struct("100s24x12s20xc188xc")


def _one_record(n: int) -> tuple[Any, int, int]:
    """A matcher of a PAX body of ``n`` bytes that is one record naming neither path nor size
    (webdataset writes "NN mtime=...\\n" before every member), ``n``, and the header + body length."""
    if not 0 < n <= ts.MAX_EXTENDED_HEADER:
        return None, n, 0
    return re.compile(b"%d (?!path=|size=)[^=\n]+=[^\n]*\n" % n).fullmatch, n, 512 + ((n + 511) & ~511)


def _size_of(field: bytes) -> int:
    """A header's size field as tarstream reads it (up to a NUL, spaces stripped, octal); -1 if not."""
    sz = field.split(b"\0", 1)[0].strip(b" ")
    if not sz.isdigit():
        return -1
    try:
        return int(sz, 8)
    except ValueError:  # an 8 or a 9
        return -1


def _walk(mm: Any, size: int, np: Any) -> list[tuple[str, bytes | None, str | None]] | None:
    out: list[tuple[str, bytes | None, str | None]] = []
    heads: list[int] = []
    pending: dict[str, Any] = {}  # what PAX ("x") and GNU long-name ("L") headers say of the next member
    off, zero, unpack = 0, ts.ZERO_BLOCK, _HEAD.unpack_from
    one_pax: dict[bytes, tuple[Any, int, int]] = {}  # PAX size field -> its one-record matcher, header + body length
    sizes: dict[bytes, int] = {}  # size field -> size: a shard repeats a few (PAX headers, same-size bodies)
    media_of: dict[str, bool] = {}  # extension -> is media
    append, head = out.append, heads.append
    while True:
        if off + ts.BLOCK > size:
            return None if mm[off:size].strip(b"\0") or pending else _checked(mm, heads, out, np)
        if not mm[off] and mm[off:off + ts.BLOCK] == zero:  # a header's name is never empty: the end
            return None if pending else _checked(mm, heads, out, np)
        if mm[off + 156] == 120 and not mm[off + 345]:  # "x": a PAX header; webdataset's says only mtime
            sz = mm[off + 124:off + 136]
            if sz not in one_pax:
                one_pax[sz] = _one_record(_size_of(sz)) if len(one_pax) < 256 else (None, 0, 0)  # few in a shard
            match, n, end = one_pax[sz]
            if match is not None and match(mm[off + 512:off + 512 + n]) is not None:
                head(off)
                off += end  # nothing in it for the member
                if off > size:
                    return None
                continue
        raw_name, sz, tf, prefix = unpack(mm, off)
        n = sizes.get(sz)
        if n is None:
            n = sizes[sz] = _size_of(sz)
        if n < 0 or prefix != b"\0":
            return None
        head(off)
        if tf in (b"x", b"g", b"L"):
            off = _extended(mm, off, n, tf, size, pending)
            if off < 0:
                return None
            continue
        if tf != b"0" and tf != b"\0":
            return None
        if pending:
            name = pending.get("path") or pending.get("long") or \
                raw_name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            n = pending.get("size", n)
            pending.clear()
        else:
            name = raw_name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        end = off + 1024 + ((n - 1) & ~511) if n else off + 512  # header + data padded to blocks
        if not name or end > size:
            return None
        ext = name.rpartition("/")[2].partition(".")[2]
        media = media_of.get(ext)
        if media is None:
            media = media_of[ext] = _is_media(ext)
        if media:
            append((name, None, None))
        elif n > MAX_TEXT_MEMBER:
            append((name, None, f"member {name!r} is {n} bytes, above the {MAX_TEXT_MEMBER}-byte limit"))
        else:
            append((name, mm[off + 512:off + 512 + n], None))
        off = end


def _extended(mm: Any, off: int, n: int, tf: bytes, size: int, pending: dict[str, Any]) -> int:
    """Read a PAX or GNU long-name header into ``pending``; the offset after it, or -1 for what the
    fast walk leaves to tarstream (oversized, malformed)."""
    end = off + 512 + ((n + 511) & ~511)
    if n > ts.MAX_EXTENDED_HEADER or end > size:
        return -1
    body = mm[off + 512:off + 512 + n]
    if tf == b"L":
        pending["long"] = body.rstrip(b"\0").decode("utf-8", "surrogateescape") or None
    elif tf == b"x":
        sp = body.find(b" ", 0, 21)
        key = body[sp + 1:body.find(b"=", sp)] if sp > 0 else b""
        if (0 < sp <= 20 and body[:sp].isdigit() and int(body[:sp]) == n >= sp + 4 and body[-1:] == b"\n"
                and key and key not in (b"path", b"size") and b"=" in body[sp:]):
            return end  # one well-formed record that names neither path nor size (webdataset: mtime)
        try:
            records = ts._pax_records(body)
        except ValueError:
            return -1
        if records.get("path"):
            pending["path"] = records["path"]
        if "size" in records:
            if not ts._DIGITS.fullmatch(records["size"].encode("utf-8", "surrogateescape")):
                return -1
            pending["size"] = int(records["size"])
    return end


def _checked(mm: Any, heads: list[int], out: list, np: Any) -> list | None:
    """``out`` if every header's checksum adds up (unsigned, as tar writes it), else None. The
    checksum field is read as tarstream reads it (up to a NUL, spaces stripped, octal digits)."""
    if not heads:
        return None
    buf = np.frombuffer(mm, dtype=np.uint8)
    view = buf[:len(buf) // ts.BLOCK * ts.BLOCK].reshape(-1, ts.BLOCK)  # headers start on block boundaries
    rows = np.asarray(heads, dtype=np.int64) // ts.BLOCK
    pos = np.arange(8)
    for lo in range(0, len(rows), 8192):  # bounded memory: 8192 headers (4 MiB) at a time
        blocks = view[rows[lo:lo + 8192]]
        field = blocks[:, 148:156].astype(np.int64)
        sums = blocks.sum(axis=1, dtype=np.int64) - field.sum(axis=1) + 8 * 32
        nul = field == 0
        inside = pos < np.where(nul.any(axis=1), nul.argmax(axis=1), 8)[:, None]
        digit = (field >= 48) & (field <= 55) & inside
        first, last = digit.argmax(axis=1), 7 - digit[:, ::-1].argmax(axis=1)
        ok = (digit.any(axis=1) & (digit.sum(axis=1) == last - first + 1)
              & ((digit | ((field == 32) & inside)) == inside).all(axis=1))
        weights = np.where(digit, 8 ** np.clip(last[:, None] - pos, 0, 7), 0)
        stored = ((field - 48) * weights).sum(axis=1)
        if not (ok.all() and np.array_equal(sums, stored)):
            return None
    del buf, view
    return out


def _kind(kind: str, exts: set[str], members: dict[str, bytes]) -> str:
    if kind != "auto":
        return kind
    if any(e.rsplit(".", 1)[-1].lower() in VIDEO_EXTS for e in exts):
        return "video"
    if b'"text_list"' in members.get("json", b""):
        return "interleaved"
    return "pair"


def _finish(key: str, exts: set[str], members: dict[str, bytes], errors: list[str], base: dict[str, Any],
            kind: str) -> Sample:
    k = _kind(kind, exts, members)
    s = SAMPLE_CLASSES[k](key=key, members=members, **base)
    if k in ("pair", "video") and "txt" in members:
        try:
            s.caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(f"caption (.txt) is not valid UTF-8 (byte {e.start})")
    if k == "interleaved" and "json" in members:
        try:
            doc = json.loads(members["json"])
            s.text_list = [str(t) for t in doc.get("text_list") or []] if isinstance(doc, dict) else []
        except (ValueError, UnicodeDecodeError) as e:
            errors.append(f"invalid JSON in document (.json): {e}")
    s.error = "; ".join(errors) or None
    return s


def read_light(url: str, kind: str = "auto", dataset: str | None = None,
               storage_options: dict[str, Any] | None = None) -> Iterator[Sample]:
    """One sample per key of the shard, with its non-media members and caption, no media read
    (module docstring). Raises :class:`ShardError` for a shard with no sample to carry an error."""
    base = {"dataset": dataset or dataset_of(url), "shard": shard_name(url), "url": url}
    key: str | None = None
    seen: set[str] = set()
    exts: set[str] = set()
    members: dict[str, bytes] = {}
    errors: list[str] = []
    fast = None
    if not storage.is_remote(url) and not url.endswith((".gz", ".tgz")):
        fast = _fast_members(storage.get_fs(url, storage_options)[1])
    with (contextlib.nullcontext() if fast is not None else open_shard(url, storage_options)) as f:
        for name, body, error in (fast if fast is not None else _members(f)):
            if "/" not in name and (dot := name.find(".")) > 0:  # the usual flat "key.ext"
                k, ext = name[:dot], name[dot + 1:]
            else:
                parts = split_key(name) if name else None
                k, ext = parts if parts else (name, None)
            fatal = error is not None and error.startswith("truncated or corrupt tar")
            if name and k != key:
                if k in seen and not fatal:
                    log.warning("tar member %r: key %r already appeared earlier in %s; skipping it", name, k, url)
                    continue
                if key is not None and not (fatal and k in seen):
                    yield _finish(key, exts, members, errors, base, kind)
                if not (fatal and k in seen):
                    key, exts, members, errors = k, set(), {}, []
                    seen.add(k)
            if key is None:
                raise ShardError(f"shard {url}: {error or 'broken tar'}")
            if error:
                errors.append(error)
            if fatal:
                break
            bad = unsafe_name(name) if ("/" in name or "\\" in name or ":" in name) else None
            if bad:
                errors.append(bad)
            if ext is None:
                errors.append(f"member {name!r} has no extension")
            elif ext in exts:
                errors.append(f"duplicate member {name!r}")
            exts.add(ext or "")
            if body is not None and ext is not None:
                members[ext] = body
    if key is not None:
        yield _finish(key, exts, members, errors, base, kind)
