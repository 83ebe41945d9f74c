"""One pass per byte: read an input shard once, verify it, and copy members out of what was read.

Resharding must prove that the bytes it copies are the bytes that were scored, and must give
every output shard its md5. Both are hashes of streams that differ (the whole input file; the
output shard), so every byte is hashed twice. This module does both while the bytes move once:

- :class:`VerifiedInput` reads an input shard in 1 MiB chunks and is the file object the tar
  scanner reads from. Every chunk goes to the input's hash (XXH3-128 for local shards, 0.03 CPU
  seconds per GB here, against md5's 1.53; blake3, sha256 and md5 for checksums earlier versions
  recorded; md5 for S3 ETags) as soon as it is read, while it is still in the CPU's cache, and
  chunks are kept until the members in them have been copied, so a member is copied from the
  very buffer that was hashed.
- :class:`GroupWriter` writes output shards from those buffers: it is given spans of
  consecutive samples (``sample_spans.Span``), each copied as one byte range per output shard it
  goes to (one ``write`` and one md5 update per read buffer, of the same bytes, still in cache;
  per-sample work only where a shard is cut), fsyncs each finished
  shard on a background thread while the next one is written, and makes nothing visible until
  the group is committed: temp files renamed locally, multipart uploads completed on S3. A
  group whose input fails verification is discarded whole.

Both hashes run in the thread that reads and writes. Handing buffers to hashing threads (as an
earlier version did) overlapped hashing with parsing in one process, but the queue handoffs and
the cache misses of hashing on another core cost 0.45 CPU seconds per GB (measured, 1 GB,
in-process); resharding runs one worker per core, so the overlap bought no wall time there.

``os.copy_file_range`` / ``sendfile`` were measured here (ext4, page cache warm) at 0.6x the
speed of ``write`` from the buffer: every byte must pass through user space for its md5
anyway, and copying from the hashed buffer also guarantees that what is written is what was
verified.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from curation.data import storage
from curation.data.records import new_hash
from curation.data.tarstream import final_size
from curation.selection.sample_spans import Piece, Span, cut

# Read size: hashing, syscalls and Python's work are per chunk, not per member, and a chunk is
# still in the CPU's cache when it is hashed, scanned and written. 1 MiB and 512 KiB measured the
# same here (CPU per GB, in-process, 1 GB; peak RSS of a shuffled reshard, 303 MB both); reads of
# this size come from malloc's heap (2 MiB and larger are mapped fresh each time: page faults).
CHUNK = 1 << 20
_HEAP_KEPT = False


def keep_heap() -> None:
    """Have glibc's malloc keep freed read buffers for the next reads (once per process). A batch's
    buffers are freed together; by default malloc then hands the top of its heap back to the kernel
    and the next reads fault those pages in again (80 thousand minor faults per GB here, against
    9.6 thousand for a copy that frees each buffer as it goes). Buffers up to 4 MiB come from the
    heap, and up to 64 MiB of freed heap is kept. Elsewhere than glibc: nothing."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return
    _HEAP_KEPT = True
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (setting it ends glibc's own adjusting of both)
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class HashFeed:
    """A hash (md5 unless told) of a stream of buffers, with the number of bytes it was given."""

    def __init__(self, algo: str = "md5") -> None:
        self.digest = new_hash(algo)
        self.size = 0

    def update(self, buf: Any) -> None:
        self.size += len(buf)
        self.digest.update(buf)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


class VerifiedInput:
    """A read-only binary stream over one input shard that hashes every byte read from it.

    ``read``/``tell`` serve the tar scanner; :meth:`pieces` gives the already-read bytes of
    a range without copying them; :meth:`release` lets go of chunks wholly behind the
    current position; :meth:`finish` reads to the end of the file and returns (size, hex digest).
    """

    def __init__(self, f: BinaryIO, chunk: int = CHUNK, algo: str = "md5") -> None:
        keep_heap()
        self._f = f
        self._chunk = chunk
        self._chunks: deque[tuple[int, bytes]] = deque()  # (offset, data), contiguous
        self._end = 0  # offset just past the last chunk fetched
        self._pos = 0
        self.algo = algo
        self.hash = HashFeed(algo)

    def _fetch(self) -> bytes:
        data = self._f.read(self._chunk)
        if data:
            self.hash.update(data)
            self._end += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        pos = self._pos
        if n >= 0 and self._chunks:  # fast path: inside the newest chunk (headers, most members)
            off, data = self._chunks[-1]
            if off <= pos and pos + n <= off + len(data):
                self._pos = pos + n
                return data[pos - off: pos - off + n]
        want = pos + n if n >= 0 else None
        while want is None or self._end < want:
            data = self._fetch()
            if not data:
                break
            self._chunks.append((self._end - len(data), data))
        stop = self._end if want is None else min(want, self._end)
        parts = [buf[lo:hi] for buf, lo, hi in self.pieces(pos, stop)]
        self._pos = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def tell(self) -> int:
        return self._pos

    def advance(self, n: int) -> bool:
        """Move ``n`` bytes on without copying them (they stay in the read buffers for :meth:`pieces`);
        False, and the position unchanged, when the file ends first."""
        want = self._pos + n
        while self._end < want:
            data = self._fetch()
            if not data:
                return False
            self._chunks.append((self._end - len(data), data))
        self._pos = want
        return True

    def newest(self) -> tuple[int, bytes]:
        """(offset, bytes) of the chunk read last, for a scanner that reads its headers in place."""
        return self._chunks[-1] if self._chunks else (self._pos, b"")

    def seek(self, pos: int) -> bool:
        """Move to ``pos`` (not before the chunks held), reading up to it; False, and the position
        unchanged, when the file ends first."""
        return self.advance(pos - self._pos)

    def pieces(self, start: int, stop: int) -> list[Piece]:
        """The bytes ``[start, stop)`` (already read, not released) as pieces of the read buffers."""
        off, data = self._chunks[-1] if self._chunks else (0, b"")
        if off <= start and stop <= off + len(data):
            return [(data, start - off, stop - off)]
        out: list[Piece] = []
        for off, data in self._chunks:
            lo, hi = max(start, off), min(stop, off + len(data))
            if lo < hi:
                out.append((data, lo - off, hi - off))
        return out

    def last(self, nbytes: int, head: bytes) -> list[Piece] | None:
        """Pieces of the last ``nbytes`` read, provided they start with ``head`` (an entry's header
        blocks); None when they do not, i.e. the entry's blocks were not contiguous in the file."""
        start = self._pos - nbytes
        pieces = self.pieces(start, self._pos) if start >= 0 else []
        if len(pieces) == 1:
            buf, lo, _ = pieces[0]
            ok = buf[lo: lo + len(head)] == head
        else:
            ok = b"".join(buf[lo:hi] for buf, lo, hi in pieces)[: len(head)] == head
        complete = sum(hi - lo for _, lo, hi in pieces) == nbytes  # nothing of it released yet
        return pieces if ok and complete else None

    def release(self, upto: int | None = None) -> None:
        """Let go of the chunks wholly before ``upto`` (the current position by default)."""
        upto = self._pos if upto is None else upto
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= upto:
            self._chunks.popleft()

    def finish(self) -> tuple[int, str]:
        """Hash the rest of the file (end blocks, padding, anything after); (size, hex digest)."""
        self._chunks.clear()
        while self._fetch():
            pass
        return self._end, self.hash.hexdigest()

    def close(self) -> None:
        self._chunks.clear()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


class _OutputShard:
    """One output shard being written: a temp file (locally) or an open upload (object stores)."""

    def __init__(self, url: str, storage_options: dict | None) -> None:
        self.url = url
        self.nsamples = 0
        self.sources: dict[str, int] = {}
        self.hash = HashFeed()
        self._run: list[Any] | None = None  # [buffer, start, end] waiting to be written (coalescing)
        self._fsync: Future | None = None
        self._fd: int | None = None
        self._upload: Any = None
        self._tmp: str | None = None
        fs, self._path = storage.get_fs(url, storage_options)
        if storage.is_remote(url):
            self._upload = fs.open(self._path, "wb")  # the object appears only when the upload completes
        else:
            parent = os.path.dirname(self._path)
            with storage.naming(url):
                os.makedirs(parent, exist_ok=True)
                tmp = os.path.join(parent, f".{os.path.basename(self._path)}.tmp-{uuid.uuid4().hex[:8]}")
                self._fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._tmp = tmp

    @property
    def size(self) -> int:
        return self.hash.size + (self._run[2] - self._run[1] if self._run else 0)

    def add(self, buf: Any, start: int, end: int) -> None:
        run = self._run
        if run is not None and run[0] is buf and run[2] == start:
            run[2] = end  # the next member follows in the same buffer: one write, one hash update
            return
        self._flush()
        self._run = [buf, start, end]

    def _flush(self) -> None:
        if self._run is None:
            return
        buf, start, end = self._run
        self._run = None
        view = memoryview(buf)[start:end]
        with storage.naming(self.url):  # a full disk or a store's error names the shard
            if self._fd is not None:
                _write_all(self._fd, view)
            else:
                self._upload.write(view)
        self.hash.update(view)

    def close(self, fsyncs: ThreadPoolExecutor) -> None:
        """End the archive (two zero blocks, padded to a whole record) and start its fsync."""
        self._flush()
        pad = final_size(self.size) - self.size
        self.add(bytes(pad), 0, pad)
        self._flush()
        if self._fd is not None:
            self._fsync = fsyncs.submit(os.fsync, self._fd)

    def finish(self) -> dict[str, Any]:
        """Wait for the hash and the fsync (where a full disk can still fail); nothing visible yet."""
        md5 = self.hash.hexdigest()
        if self._fd is not None:
            assert self._fsync is not None
            with storage.naming(self.url):
                self._fsync.result()
            os.close(self._fd)
            self._fd = None
        return {"url": self.url, "nsamples": self.nsamples, "filesize": self.hash.size, "md5sum": md5,
                "sources": self.sources}

    def publish(self) -> None:
        """Make the finished shard visible: rename the temp file, or complete the upload."""
        if self._tmp is not None:
            os.replace(self._tmp, self._path)
            self._tmp = None
        elif self._upload is not None:
            with storage.naming(self.url):
                self._upload.close()
            self._upload = None

    def discard(self) -> None:
        if self._fd is not None:
            if self._fsync is not None:
                self._fsync.exception()  # wait: the descriptor is in use until the fsync returns
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tmp = None
        elif self._upload is not None:
            if hasattr(self._upload, "discard"):
                self._upload.discard()  # s3fs: abort the multipart upload
            self._upload.closed = True
            self._upload = None


class GroupWriter:
    """Numbered output shards of one group, rolled by sample count and bytes, committed together.

    Use as a context manager: leaving it with an exception (or without :meth:`commit`)
    discards every shard of the group, so readers never see part of a group.
    """

    def __init__(self, ds_url: str, pattern: str, max_samples: int, max_bytes: int,
                 storage_options: dict | None = None) -> None:
        self.ds_url, self.pattern = ds_url, pattern
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.storage_options = storage_options
        self._shards: list[_OutputShard] = []
        self._open: _OutputShard | None = None
        self._fsyncs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reshard-fsync")
        self._committed = False

    def write(self, source: str, span: Span) -> None:
        """Append a span of samples (their members' raw blocks, as pieces of hashed input buffers):
        one byte range per output shard it goes to, cut where the shard is full (by samples, or
        by bytes before the sample that would pass ``max_bytes``; a shard takes its first sample
        whatever its size)."""
        bounds, n, i = span.bounds, len(span.keys), 0
        while i < n:
            cur = self._open
            if cur is not None and (cur.nsamples >= self.max_samples or
                                    final_size(cur.size + bounds[i + 1] - bounds[i]) > self.max_bytes):
                cur.close(self._fsyncs)
                cur = self._open = None
            if cur is None:
                url = storage.join(self.ds_url, self.pattern.format(index=len(self._shards)))
                cur = self._open = _OutputShard(url, self.storage_options)
                self._shards.append(cur)
            j = i + 1
            if j < n:  # the samples after i that still fit (final_size grows with its argument)
                room = min(n, i + self.max_samples - cur.nsamples)
                size, start = cur.size, bounds[i]
                fit = bisect.bisect_right(bounds, self.max_bytes, j + 1, room + 1,
                                          key=lambda b: final_size(size + b - start))
                j = max(j, fit - 1)
            for buf, lo, hi in span.pieces if j - i == n else cut(span.pieces, bounds[i] - bounds[0], bounds[j] - bounds[0]):
                cur.add(buf, lo, hi)
            cur.nsamples += j - i
            cur.sources[source] = cur.sources.get(source, 0) + j - i
            i = j

    def commit(self) -> list[dict[str, Any]]:
        """Finish the last shard, wait for every hash and fsync (a full disk fails here, with nothing
        visible yet), then make every shard visible in order."""
        if self._open is not None:
            self._open.close(self._fsyncs)
            self._open = None
        done = [s.finish() for s in self._shards]
        for s in self._shards:
            s.publish()
        self._committed = True
        return done

    def discard(self) -> None:
        for s in self._shards:
            s.discard()
        self._shards, self._open = [], None

    def __enter__(self) -> "GroupWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if not self._committed:
                self.discard()
        finally:
            self._fsyncs.shutdown(wait=True)
