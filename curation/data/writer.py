"""WebDataset shard writers over fsspec (local folders and ``s3://``).

webdataset's own ``gopen`` cannot open ``s3://``; this writer opens every shard through
fsspec, writes it atomically (temp name + rename locally, a single upload on S3), and
rolls over to a new shard when a sample count or byte limit is reached. Tars are
deterministic: members keep their order, mtime/uid/gid are fixed, so the same samples
give the same bytes (and the same md5) on every run.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from curation.data import storage
from curation.data.diskfull import naming_full_disk
from curation.data.samples import Sample
from curation.data.tarstream import final_size


@dataclass
class WrittenShard:
    url: str
    nsamples: int
    filesize: int
    md5sum: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _HashingWriter(io.RawIOBase):
    """File wrapper that md5s and counts what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.md5 = hashlib.md5()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        b = bytes(b)
        self.f.write(b)
        self.md5.update(b)
        self.size += len(b)
        return len(b)


def _member_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"tar member values must be bytes or str, got {type(value).__name__}; encode them first")


def tar_size_of(members: Mapping[str, bytes], key: str) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus padded data
    (plus a long-name header when the name exceeds 100 characters)."""
    total = 0
    for ext, data in members.items():
        name = f"{key}.{ext}"
        total += 512 + (len(data) + 511) // 512 * 512
        if len(name.encode()) > 100:
            total += 512 + (len(name.encode()) + 1 + 511) // 512 * 512
    return total


class TarSink:
    """Write samples into a single tar opened through fsspec."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, mtime: int = 0) -> None:
        self.url = url
        self.mtime = mtime
        self.nsamples = 0
        self._ctx = storage.atomic_write(url, storage_options)
        self._raw = self._ctx.__enter__()
        self._hash = _HashingWriter(self._raw)
        # GNU format: long member names without PAX records, read by every tar tool
        self._tar = tarfile.open(fileobj=self._hash, mode="w|", format=tarfile.GNU_FORMAT)
        self._keys: set[str] = set()

    def write(self, key: str, members: Mapping[str, Any]) -> None:
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty and have no '.' in its last path part")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.url}")
        self._keys.add(key)
        for ext, value in members.items():
            if ext.startswith("__"):
                continue  # __key__, __url__ and friends are metadata, not members
            data = _member_bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = 0o444
            info.uname = info.gname = ""
            with naming_full_disk(self.url):  # ENOSPC/EFBIG: "no space left writing <shard>"
                self._tar.addfile(info, io.BytesIO(data))
        self.nsamples += 1

    def close(self) -> WrittenShard:
        try:
            with naming_full_disk(self.url):
                self._tar.close()  # the end blocks and tar's buffer: a full disk can fail here
        except BaseException as e:
            self.abort(e)  # the temp file goes; nothing becomes visible
            raise
        self._ctx.__exit__(None, None, None)  # flush, fsync, rename: a full disk is named there too
        return WrittenShard(self.url, self.nsamples, self._hash.size, self._hash.md5.hexdigest())

    def abort(self, exc: BaseException) -> None:
        try:
            self._tar.close()
        except OSError:
            pass  # a full disk fails the end blocks again: the file is discarded anyway
        finally:
            try:
                self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:  # noqa: BLE001 - the context re-raises exc; we raise it ourselves
                pass


class ShardWriter:
    """Write samples into numbered shards under ``out`` (a folder or ``s3://`` prefix).

    A new shard starts when the current one holds ``max_samples`` samples or adding the
    next sample would pass ``max_bytes``. ``pattern`` names shards from their index,
    e.g. ``"{index:05d}.tar"`` (img2dataset) or ``"curated-{index:06d}.tar"``.

    Use as a context manager; ``written`` lists the finished shards.
    """

    def __init__(
        self,
        out: str,
        pattern: str = "{index:05d}.tar",
        max_samples: int = 10_000,
        max_bytes: int = 3 << 30,
        start_index: int = 0,
        storage_options: dict[str, Any] | None = None,
        mtime: int = 0,
    ) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        if max_bytes < 1024:
            raise ValueError("max_bytes must be >= 1024")
        self.out = out
        self.pattern = pattern
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.index = start_index
        self.storage_options = storage_options
        self.mtime = mtime
        self.written: list[WrittenShard] = []
        self._sink: TarSink | None = None
        self._bytes = 0
        storage.makedirs(out, storage_options)

    def shard_url(self, index: int) -> str:
        return storage.join(self.out, self.pattern.format(index=index))

    def _open(self) -> TarSink:
        self._sink = TarSink(self.shard_url(self.index), self.storage_options, self.mtime)
        self._bytes = 0
        self.index += 1
        return self._sink

    def _roll(self) -> None:
        if self._sink is not None:
            self.written.append(self._sink.close())
            self._sink = None

    def write(self, sample: Sample | Mapping[str, Any]) -> str:
        """Write one sample (a ``Sample`` or a webdataset dict with ``__key__``); returns the shard URL."""
        if isinstance(sample, Sample):
            key, members = sample.key, sample.members
        else:
            key, members = str(sample["__key__"]), {k: v for k, v in sample.items() if not k.startswith("__")}
        size = tar_size_of({k: _member_bytes(v) for k, v in members.items()}, key)
        sink = self._sink
        # the closed file also holds tar's end blocks and record padding: count them too
        if sink is not None and (sink.nsamples >= self.max_samples or
                                 (sink.nsamples > 0 and final_size(self._bytes + size) > self.max_bytes)):
            self._roll()
            sink = None
        if sink is None:
            sink = self._open()
        sink.write(key, members)
        self._bytes += size
        return sink.url

    def close(self) -> list[WrittenShard]:
        self._roll()
        return self.written

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self._sink is not None:
            self._sink.abort(exc)
            self._sink = None
            return
        self.close()
