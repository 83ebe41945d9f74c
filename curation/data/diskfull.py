"""A full disk, named: ``no space left writing <file>`` instead of ``[Errno 28]`` with no file.

The kernel reports a full filesystem as ENOSPC, a full quota as EDQUOT and a file past the
process's size limit (``ulimit -f``, RLIMIT_FSIZE) as EFBIG, none of them naming the file that
was being written (``os.write`` and ``fsync`` errors carry no path). Every writer that makes
files visible (``storage.atomic_write``, the shard writers, the reshard's output shards) turns
them into :class:`NoSpaceError`, which names the file the user will look for, while the temp
file it was writing is removed. It stays an ``OSError`` with the original errno, so code that
catches ``OSError`` still does, and it survives pickling (a Ray task's error carries it).
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_WHY = {errno.EDQUOT: " (disk quota exceeded)",
        errno.EFBIG: " (the file passed the size limit of this process: ulimit -f / RLIMIT_FSIZE)"}


class NoSpaceError(OSError):
    """A write that failed because the filesystem (or quota, or file-size limit) is full."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def no_space(url: str, e: OSError) -> NoSpaceError:
    return NoSpaceError(e.errno, f"no space left writing {url}{_WHY.get(e.errno or 0, '')}")


@contextmanager
def naming_full_disk(url: str) -> Iterator[None]:
    """Re-raise a disk-full ``OSError`` from the block as a :class:`NoSpaceError` naming ``url``."""
    try:
        yield
    except NoSpaceError:
        raise
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise no_space(url, e) from e
