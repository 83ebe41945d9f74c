"""Shards as tar records: where shards are, and the raw members of each sample, streamed.

A shard is a POSIX tar whose members are grouped into samples by key: the member
``a/b/000123.jpg`` belongs to sample ``a/b/000123`` with extension ``jpg`` (the WebDataset
convention: the key runs up to the first dot of the base name). Members of a sample are
contiguous in the tar. :func:`iter_raw_samples` streams a tar (``curation.data.tarstream.scan``
over an fsspec file object), holds one sample in memory at a time and never extracts anything
to disk. Turning raw members into typed samples is ``curation.data.builders``' job.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import braceexpand

from curation.data import storage
from curation.data.tarstream import TarFormatError, scan

log = logging.getLogger(__name__)

# One member larger than this is not read into memory (bounded memory per sample).
DEFAULT_MAX_MEMBER_BYTES = 1 << 30

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# --------------------------------------------------------------------------- shard URLs


def shard_name(url: str) -> str:
    """``s3://b/coyo/00012.tar`` -> ``00012``."""
    name = storage.basename(url)
    for suf in TAR_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def dataset_of(url: str) -> str:
    """The default dataset name of a shard: its parent folder's name."""
    return storage.basename(storage.dirname(url))


def list_shards(spec: str | Iterable[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand a shard spec into sorted shard URLs.

    Accepts a single ``.tar`` URL, a folder (every tar directly inside), a brace pattern
    (``data/{00000..00009}.tar``, the WebDataset convention), a glob, or a list of these.
    """
    if not isinstance(spec, str):
        out: list[str] = []
        for s in spec:
            out.extend(list_shards(s, storage_options))
        return sorted(dict.fromkeys(out))
    urls: list[str] = []
    for one in braceexpand.braceexpand(spec):
        if any(ch in one for ch in "*?["):
            fs, path = storage.get_fs(one, storage_options)
            urls.extend(storage.to_url(fs, p) for p in sorted(fs.glob(path)) if p.endswith(TAR_SUFFIXES))
        elif one.endswith(TAR_SUFFIXES):
            urls.append(one)
        else:
            found = [u for u in storage.list_files(one, storage_options=storage_options) if u.endswith(TAR_SUFFIXES)]
            if not found and not storage.exists(one, storage_options):
                raise FileNotFoundError(f"no such shard or folder: {one}")
            urls.extend(found)
    return sorted(dict.fromkeys(urls))


# --------------------------------------------------------------------------- raw tar stream


class ShardError(ValueError):
    """A shard that holds no sample to report an error on: empty, or not a tar at all. Every
    other problem with a tar is reported on the sample it damaged."""


@dataclass
class RawMember:
    name: str
    data: bytes | None
    error: str | None = None
    fatal: bool = False  # the tar broke here: nothing after this member can be read
    offset: int = -1  # where its blocks start and end in the (uncompressed) tar stream
    end: int = -1


def split_key(name: str) -> tuple[str, str] | None:
    m = _KEY_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2)


def unsafe_name(name: str) -> str | None:
    """Why a member name is unsafe to use as a path, or None."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return f"absolute member path {name!r}"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return f"member path with '..' {name!r}"
    return None


def iter_members(fileobj: Any, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawMember]:
    """Stream the members of a tar (never extracting anything).

    When the tar itself is broken (truncated, malformed header, cut gzip stream) the last
    member is ``fatal``: it carries the error, named after the member the damage belongs to,
    or ``""`` when no trustworthy name is left; everything before it was yielded as usual.
    """
    try:
        for e in scan(fileobj, max_size=max_member_bytes):
            if not e.is_file:
                yield RawMember(e.name, None, f"unsupported tar member type for {e.name!r} (links and devices are refused)",
                                offset=e.offset, end=e.end)
            elif e.skipped:
                yield RawMember(e.name, None, f"member {e.name!r} is {e.size} bytes, above the {max_member_bytes}-byte limit",
                                offset=e.offset, end=e.end)
            else:
                yield RawMember(e.name, e.data, offset=e.offset, end=e.end)
    except TarFormatError as err:
        yield RawMember(err.member or "", None, f"truncated or corrupt tar: {err}", fatal=True)


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    start: int = -1  # byte range of its members in the (uncompressed) tar stream: [start, end)
    end: int = -1


def _key_of(name: str) -> tuple[str, str | None]:
    parts = split_key(name)
    return parts if parts else (name, None)


def iter_raw_samples(fileobj: Any, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """Group tar members into samples by key (contiguous members, WebDataset style).

    A broken tar ends the stream after every sample complete before the damage: the error
    goes to the sample the damaged member belongs to (a new record when it starts a new
    key), or to the sample being assembled when the damage names no member. A shard with
    no sample to carry the error (empty, not a tar) raises :class:`ShardError`. Members of
    a key that reappears after other keys are not a sample of their own (WebDataset would
    yield the key twice); they are skipped with a warning so that every key has one record.
    """
    current: RawSample | None = None
    seen: set[str] = set()
    for m in iter_members(fileobj, max_member_bytes):
        key, ext = _key_of(m.name)
        starts_new = m.name != "" and (current is None or key != current.key)
        if starts_new and key in seen:
            if not m.fatal:
                log.warning("tar member %r: key %r already appeared earlier in this shard (members not "
                            "contiguous); skipping it", m.name, key)
                continue
            starts_new = False  # the damage names an earlier sample: report it on the one being read
        if starts_new:
            if current is not None:
                yield current
            current = RawSample(key=key, start=m.offset)
            seen.add(key)
        if current is None:  # the tar broke before its first member
            raise ShardError(m.error or "broken tar")
        if m.fatal:
            current.errors.append(m.error or "broken tar")
            yield current
            return
        _add_member(current, m, ext)
    if current is not None:
        yield current


def _add_member(sample: RawSample, m: RawMember, ext: str | None) -> None:
    sample.end = max(sample.end, m.end)
    bad = unsafe_name(m.name)
    if bad:
        sample.errors.append(bad)
    if ext is None:
        sample.errors.append(f"member {m.name!r} has no extension")
    if m.error:
        sample.errors.append(m.error)
    elif (ext or "") in sample.members:
        sample.errors.append(f"duplicate member {m.name!r}")
    else:
        sample.members[ext or ""] = m.data or b""


class ShardChangedError(OSError):
    """A shard rewritten while it was being read: its bytes are not one version (retried)."""


@dataclass
class ShardDigest:
    """What reading a shard learns about its bytes, filled in by :func:`open_shard` as it opens
    the file and by :meth:`finish` after the last sample: the planner never reads shard bytes,
    the worker that reads them anyway hashes them on the way (``hashlib``, ``xxhash`` and ``blake3`` release the GIL)."""

    size: int = 0
    version: str = ""  # ``size:mtime`` locally, the ETag on an object store (storage.stat_files)
    checksum: str = ""  # ``xxh128:<hex>`` of every byte locally; the ETag on an object store
    bytes_read: int = 0
    _file: Any = field(default=None, repr=False)
    _hash: Any = field(default=None, repr=False)
    _where: Any = field(default=None, repr=False)

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        if self._hash is not None:
            self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def finish(self) -> "ShardDigest":
        """Hash the rest of the file (tar padding, anything after a damaged member) and check
        that the file did not change while it was read."""
        while self.read(1 << 20):
            pass
        if self._hash is not None:
            self.checksum = format_checksum(CHECKSUM_ALGO, self._hash.hexdigest())
            fs, path = self._where
            if storage.file_version(fs, path) != (self.size, self.version) or self.bytes_read != self.size:
                raise ShardChangedError(f"shard {storage.to_url(fs, path)} changed while it was read")
        self._file.close()
        return self


class _DigestFile:
    """The file object a reader sees: reads go through the digest."""

    def __init__(self, digest: ShardDigest) -> None:
        self.digest = digest

    def read(self, n: int = -1) -> bytes:
        return self.digest.read(n)

    def close(self) -> None:
        self.digest._file.close()

    def __enter__(self) -> "_DigestFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_shard(url: str, storage_options: dict[str, Any] | None = None, digest: ShardDigest | None = None):
    """Open a shard for streaming; ``.tar.gz`` / ``.tgz`` are decompressed on the fly. With
    ``digest``, its version is taken at open and every byte read is hashed (call
    ``digest.finish()`` after the last sample)."""
    if digest is None:
        f = storage.open_url(url, "rb", storage_options)
    else:
        fs, path = storage.get_fs(url, storage_options)
        digest.size, digest.version = storage.file_version(fs, path)
        digest._file, digest._where = storage.open_url(url, "rb", storage_options), (fs, path)
        if storage.is_remote(url) and not digest.version.count(":"):
            digest.checksum = digest.version  # the ETag names the object's bytes
        else:
            digest._hash = new_hash(CHECKSUM_ALGO)
        f = _DigestFile(digest)
    if url.endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def count_samples(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Number of keys in a shard, without decoding any media."""
    with open_shard(url, storage_options) as f:
        return sum(1 for _ in iter_raw_samples(f))


# --------------------------------------------------------------------------- shard info


@dataclass
class ShardInfo:
    url: str
    dataset: str
    name: str
    size: int
    checksum: str  # "xxh128:<hex>" of the bytes locally; the ETag on S3
    stats: dict[str, Any] | None = None  # img2dataset's <shard>_stats.json when present
    parquet: str | None = None  # img2dataset's per-shard <shard>.parquet when present


# The hash local shards are checksummed with when they are scored, and verified with when they are
# resharded (every input byte): XXH3-128 (the ``xxhash`` package; the checksum rsync >= 3.2 uses for
# its transfers): 0.03 CPU s/GB here against BLAKE3's 0.28, sha256's 0.65 and md5's 1.53 (1 MiB
# updates, one thread, one run, 2026-12-07). What the check is for is a shard that changed or was cut since it was
# scored, which a 128-bit non-cryptographic hash detects; it is not tamper-proof (anyone who can
# write the shard can make another with the same XXH3). Checksums recorded earlier
# (``blake3:<hex>``, ``sha256:<hex>``, a bare md5) keep being verified with their own hash.
CHECKSUM_ALGO = "xxh128"
_PREFIXED = ("xxh128", "blake3", "sha256")
# Cheapest first: of two checksums recorded for one shard, resharding verifies the first of these.
BY_COST = ("xxh128", "blake3", "sha256", "md5")


def checksum_algo(checksum: str) -> str:
    """The hash a recorded checksum was made with: ``xxh128`` for ``xxh128:<hex>`` (what local
    shards get), ``blake3`` and ``sha256`` for ``blake3:<hex>`` and ``sha256:<hex>`` (local shards
    scored by earlier versions), ``md5`` for a bare hex digest (older versions still; S3 ETags)."""
    algo = checksum.split(":", 1)[0]
    return algo if algo in _PREFIXED and ":" in checksum else "md5"


def format_checksum(algo: str, hexdigest: str) -> str:
    return f"{algo}:{hexdigest}" if algo in _PREFIXED else hexdigest


def new_hash(algo: str) -> Any:
    """A hash object (``update``, ``hexdigest``) for ``algo``: ``xxh128`` (XXH3-128, the ``xxhash``
    package), ``blake3`` (the ``blake3`` package, one thread) or any ``hashlib`` name."""
    if algo == "xxh128":
        import xxhash

        return xxhash.xxh3_128()
    if algo == "blake3":
        import blake3

        return blake3.blake3()
    return hashlib.new(algo)


def file_checksum(url: str, storage_options: dict[str, Any] | None = None,
                  algo: str = CHECKSUM_ALGO) -> tuple[int, str]:
    """(size, checksum): the ETag of an object in a store, else a hash of the bytes.

    Local shards get ``xxh128:<hex>`` (:data:`CHECKSUM_ALGO`); ``algo`` names another hash, as
    recorded by :func:`checksum_algo` (``blake3``, ``sha256``; ``md5``: the bare hex digest that shard
    indexes and manifests record for output shards, and earlier versions for inputs).
    """
    fs, path = storage.get_fs(url, storage_options)
    info = fs.info(path)
    if storage.is_remote(url) and info.get("ETag"):
        return int(info["size"]), str(info["ETag"]).strip('"')
    h = new_hash(algo)
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return int(info["size"]), format_checksum(algo, h.hexdigest())


def shard_info(url: str, dataset: str | None = None, storage_options: dict[str, Any] | None = None) -> ShardInfo:
    size, checksum = file_checksum(url, storage_options)
    name = shard_name(url)
    base = storage.dirname(url)
    stats_url = storage.join(base, f"{name}_stats.json")
    parquet_url = storage.join(base, f"{name}.parquet")
    stats = None
    if storage.exists(stats_url, storage_options):
        try:
            stats = json.loads(storage.read_bytes(stats_url, storage_options))
        except ValueError:
            log.warning("ignoring unreadable stats file %s", stats_url)
    return ShardInfo(
        url=url,
        dataset=dataset or dataset_of(url),
        name=name,
        size=size,
        checksum=checksum,
        stats=stats,
        parquet=parquet_url if storage.exists(parquet_url, storage_options) else None,
    )
