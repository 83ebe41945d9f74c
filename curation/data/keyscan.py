"""Samples without their media: keys, captions and small members, for scorers that decode nothing.

A scorer that needs no pixels (``meta`` imports shipped metadata, ``text`` reads captions) says
so with ``needs_media = False``; the engine then reads its shards with :func:`read_light`
instead of :func:`curation.data.shards.read_shard`. Image and video bodies are never read and
nothing is decoded: a shard of images costs little more than its headers and its text members.

An uncompressed shard is indexed by :mod:`curation.data.tarindex` (a local one from a memory
map, a remote one in large windows), every header checked as :mod:`curation.data.tarstream`
checks it. When all its names are flat ``key.ext`` (as img2dataset and webdataset write them),
its members are grouped into samples with numpy; other names go through the same loop as the
streaming path. A shard the index leaves alone (gzipped, damaged, links, ...) is read by
:func:`curation.data.tarstream.scan`, media bodies seeked past.

Each key still becomes exactly one sample, of the shard's kind, with its non-media members as
bytes (``members``) and, for pairs and clips, its ``caption`` from the ``.txt`` member. Tar damage
is reported on the sample it hits, as :func:`curation.data.records.iter_raw_samples` does; what
only decoding could find (a corrupt image) is not this reader's to report.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from curation.data import storage
from curation.data import tarindex
from curation.data import tarstream as ts
from curation.data.records import ShardError, dataset_of, open_shard, shard_name, split_key, unsafe_name
from curation.data.samples import IMAGE_EXTS, SAMPLE_CLASSES, VIDEO_EXTS, Sample

log = logging.getLogger(__name__)

MEDIA_EXTS = frozenset(IMAGE_EXTS + VIDEO_EXTS + ("gif", "bmp", "tif", "tiff"))
MAX_TEXT_MEMBER = 64 << 20  # a non-media member larger than this is skipped and reported


@lru_cache(maxsize=256)
def _is_media(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in MEDIA_EXTS


def _media_name(name: str) -> bool:
    return _is_media(name.rpartition("/")[2].partition(".")[2])


def _oversize(name: str, size: int) -> str:
    return f"member {name!r} is {size} bytes, above the {MAX_TEXT_MEMBER}-byte limit"


def _members(f: Any) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, body or None when skipped, error) per regular member, from the streaming scanner
    (media bodies seeked past); a last ("", None, error) when the tar breaks (tarstream's rules)."""
    try:
        for e in ts.scan(f, max_size=MAX_TEXT_MEMBER, skip=_media_name):
            if not e.is_file:
                yield e.name, None, f"unsupported tar member type for {e.name!r} (links and devices are refused)"
            elif e.skipped:
                yield e.name, None, None if _media_name(e.name) else _oversize(e.name, e.size)
            else:
                yield e.name, e.data, None
    except ts.TarFormatError as err:
        yield err.member or "", None, f"truncated or corrupt tar: {err}"


# ---- the fast path: a member index (curation.data.tarindex), samples grouped with numpy --------
_POS100 = np.arange(100)


def _exts(names: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The first dot's position and the extension (up to 8 bytes, as a number) of each name, when
    every name is a flat "key.ext"; None otherwise (a "/", "\\" or ":" in a name: paths and
    unsafe names take the loop)."""
    if not len(names):
        return None
    used = int(100 - names.any(axis=0)[::-1].argmax())  # the longest name's length
    head = names[:, :used]
    if ((head == 47) | (head == 92) | (head == 58)).any():
        return None
    dot = (head == 46).argmax(axis=1)  # 0 also when there is no dot
    length = used - (head == 0).sum(axis=1)  # NULs only after the name (tarindex masks the rest)
    if (dot == 0).any() or (dot > 91).any() or (length - dot > 9).any():
        return None
    codes = np.zeros(len(names), dtype=np.uint64)
    for d in np.unique(dot).tolist():
        rows = np.flatnonzero(dot == d)
        codes[rows] = names[rows, d + 1:d + 9].copy().view(np.uint64).ravel()
    return dot, codes


def _ext_str(code: int) -> str:
    return code.to_bytes(8, "little").rstrip(b"\0").decode("utf-8", "surrogateescape")


class _Want:
    """Which members' bodies to read (not media, not above :data:`MAX_TEXT_MEMBER`), a window at
    a time; keeps each window's :func:`_exts` for the grouping."""

    def __init__(self) -> None:
        self.exts: list[tuple[np.ndarray, np.ndarray] | None] = []

    def __call__(self, names: np.ndarray, sizes: np.ndarray, renamed: dict[int, str]) -> np.ndarray:
        got = None if renamed else _exts(names)
        self.exts.append(got)
        if got is None:
            found = tarindex.Found(names, sizes, renamed, [], np.zeros(0, bool))
            media = np.array([_media_name(found.name(i)) for i in range(len(sizes))], dtype=bool)
        else:
            uniq, inv = np.unique(got[1], return_inverse=True)
            media = np.array([_is_media(_ext_str(c)) for c in uniq.tolist()], dtype=bool)[inv]
        return ~media & (sizes <= MAX_TEXT_MEMBER)


def _indexed(url: str, storage_options: dict[str, Any] | None) -> tuple[tarindex.Found | None, _Want]:
    """The members of an uncompressed shard from :mod:`curation.data.tarindex` (local: a memory
    map; remote: large windows), or None when that path leaves the shard to :func:`_members`."""
    want = _Want()
    if url.endswith((".gz", ".tgz")):
        return None, want
    fs, path = storage.get_fs(url, storage_options)
    if not storage.is_remote(url):
        with open(path, "rb") as f:
            return tarindex.members(f, os.fstat(f.fileno()).st_size, want, local=True), want
    with storage.open_url(url, "rb", storage_options) as f:
        size = getattr(f, "size", None)
        return tarindex.members(f, size if isinstance(size, int) else fs.size(path), want, local=False), want


def _listed(found: tarindex.Found) -> Iterator[tuple[str, bytes | None, str | None]]:
    """The index's members as :func:`_members` gives them, for the loop in :func:`read_light`."""
    for i, (body, n) in enumerate(zip(found.bodies, found.sizes.tolist())):
        name = found.name(i)
        yield name, body, _oversize(name, n) if body is None and n > MAX_TEXT_MEMBER and not _media_name(name) else None


def _layout(found: tarindex.Found, got: tuple[np.ndarray, np.ndarray] | None) -> tuple | None:
    """(first member of each sample, sample of each member, extension number of each member,
    extensions, keys) of an index whose names are all flat "key.ext", each key's members
    together, no key twice, no extension twice in a sample, no member too large (a shard as
    img2dataset or webdataset write them); None for any other shard."""
    if found.renamed:
        return None
    got = got if got is not None else _exts(found.names)
    if got is None or any(not _media_name(found.name(i)) for i in np.flatnonzero(found.sizes > MAX_TEXT_MEMBER).tolist()):
        return None  # a member too large to read: the loop reports it
    dot, codes = got
    width = int(dot.max())
    keys = found.names[:, :width]
    if int(dot.min()) != width:
        keys = np.where(_POS100[:width] < dot[:, None], keys, 0)
    keys = np.ascontiguousarray(keys).view(f"S{width}").ravel()
    new = np.ones(len(keys), dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    starts = np.flatnonzero(new)
    skeys = keys[starts]
    if len(skeys) > 1 and not (skeys[1:] > skeys[:-1]).all() and len(np.unique(skeys)) < len(skeys):
        return None  # a key that comes back after other keys
    uniq, inv = np.unique(codes, return_inverse=True)
    sid = np.cumsum(new) - 1
    pairs = sid * len(uniq) + inv
    if (np.bincount(pairs).max() if len(uniq) <= 64 else len(pairs) - len(np.unique(pairs)) + 1) > 1:
        return None  # an extension twice in a sample
    return starts, sid, inv, [_ext_str(c) for c in uniq.tolist()], skeys


def _grouped(found: tarindex.Found, base: dict[str, Any], kind: str,
             got: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[Sample] | None:
    """The samples of the index, grouped with numpy (:func:`_layout`); None for a shard the loop
    in :func:`_samples` reads."""
    layout = _layout(found, got)
    if layout is None:
        return None
    starts, sid, inv, exts, skeys = layout
    members: list[dict[str, bytes]] = [{} for _ in range(len(starts))]
    kept = np.flatnonzero(found.kept)
    bodies = found.bodies
    for i, s, e in zip(kept.tolist(), sid[kept].tolist(), inv[kept].tolist()):
        members[s][exts[e]] = bodies[i]
    keys = [k.decode("utf-8", "surrogateescape") for k in skeys.tolist()]
    if kind not in ("pair", "video"):
        if kind == "auto":
            video = np.array([e.rsplit(".", 1)[-1].lower() in VIDEO_EXTS for e in exts], dtype=bool)[inv]
            kinds = ["video" if v else "auto" for v in np.logical_or.reduceat(video, starts).tolist()]
        else:
            kinds = [kind] * len(starts)
        return (_build(k if k != "auto" else _kind("auto", (), m), key, m, [], base)
                for key, m, k in zip(keys, members, kinds))
    return _captioned(SAMPLE_CLASSES[kind], keys, members, base)


def _captioned(cls: type, keys: list[str], members: list[dict[str, bytes]], base: dict[str, Any]) -> Iterator[Sample]:
    """Pairs or clips with their captions: :func:`_build` without a call per sample."""
    for key, m in zip(keys, members):
        s = cls(key=key, members=m, **base)
        txt = m.get("txt")
        if txt is not None:
            try:
                s.caption = txt.decode("utf-8")
            except UnicodeDecodeError:
                s = _build(cls.kind, key, m, [], base)
        yield s


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
    return _build(_kind(kind, exts, members), key, members, errors, base)


def _build(k: str, key: str, members: dict[str, bytes], errors: list[str], base: dict[str, Any]) -> Sample:
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
    found, want = _indexed(url, storage_options)
    if found is not None and len(found):
        samples = _grouped(found, base, kind, want.exts[0] if len(want.exts) == 1 else None)
        yield from samples if samples is not None else _samples(url, base, kind, _listed(found))
        return
    with open_shard(url, storage_options) as f:
        yield from _samples(url, base, kind, _members(f))


def _samples(url: str, base: dict[str, Any], kind: str,
             listed: Iterator[tuple[str, bytes | None, str | None]]) -> Iterator[Sample]:
    """Members grouped into samples by key, as :func:`curation.data.records.iter_raw_samples`
    groups them (damage on the sample it hits; a key that comes back is skipped)."""
    key: str | None = None
    seen: set[str] = set()
    exts: set[str] = set()
    members: dict[str, bytes] = {}
    errors: list[str] = []
    for name, body, error in listed:
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
