"""Counters for measurements (benchmarks, tests): image decodes, and bytes this process read.

:func:`read_bytes_so_far` is the process's own I/O accounting (``/proc/self/io``): ``rchar``
counts every byte the process got from ``read``-like calls (files, pipes, sockets, page cache
or not), ``read_bytes`` what it made the storage layer fetch.

Decodes are counted opt-in: :func:`count_decodes` wraps Pillow's
``ImageFile.load`` while the block runs and counts the calls that had image data left to decode
(an image already loaded has no tiles left, so loading it again is not counted). It counts every
decode in the process, whichever code asked for it: the reader's verification, a scorer, a model's
preprocessing, a library. Clips are counted the same way, as the calls to PyAV's ``av.open`` for
reading (every reader of a clip here opens it to decode it).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class DecodeCount:
    """``n``: images decoded (Pillow); ``videos``: clips opened for decoding (PyAV)."""

    def __init__(self) -> None:
        self.n = 0
        self.videos = 0
        self._lock = threading.Lock()

    def add(self, what: str = "n") -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)


_active: list[DecodeCount] = []
_patch_lock = threading.Lock()


@contextmanager
def count_decodes() -> Iterator[DecodeCount]:
    """``with count_decodes() as c: ...``; then ``c.n`` is the number of decodes in the block."""
    import av
    from PIL import ImageFile

    counter = DecodeCount()
    with _patch_lock:
        if not _active:
            original = ImageFile.ImageFile.load
            av_open = av.open

            def open_(file, mode=None, *args, **kwargs):  # type: ignore[no-untyped-def]
                if mode in (None, "r"):
                    for c in list(_active):
                        c.add("videos")
                return av_open(file, mode, *args, **kwargs)

            open_.__wrapped__ = av_open  # type: ignore[attr-defined]
            av.open = open_  # callers look ``av.open`` up when they call it

            def load(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                if getattr(self, "tile", None):
                    for c in list(_active):
                        c.add()
                return original(self, *args, **kwargs)

            load.__wrapped__ = original  # type: ignore[attr-defined]
            ImageFile.ImageFile.load = load  # type: ignore[method-assign]
        _active.append(counter)
    try:
        yield counter
    finally:
        with _patch_lock:
            _active.remove(counter)
            if not _active:
                ImageFile.ImageFile.load = ImageFile.ImageFile.load.__wrapped__  # type: ignore[attr-defined]
                av.open = av.open.__wrapped__


def read_bytes_so_far() -> dict[str, int]:
    """``{"rchar": ..., "read_bytes": ...}`` of this process so far (Linux ``/proc/self/io``)."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            if k in ("rchar", "read_bytes"):
                out[k] = int(v)
    return out
