"""A minimal, fast tar scanner and writer for copying members verbatim.

Resharding copies kept samples unchanged. Re-creating headers with ``tarfile`` costs more
than moving the bytes, so this module reads each member's raw blocks (its header, any GNU
long-name or PAX blocks before it, its data and padding) and writes them back as they were:
the output members are byte-identical to the input members, headers included. The shard
reader uses the same scanner, so both see a tar the same way.

Regular files, GNU long names (``L``) and PAX extended headers (``x``, ``g``) are understood;
directories are skipped; links and devices are reported (``typeflag``) with no data. A bad
header checksum or a truncated stream raises :class:`TarFormatError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor; archives end on a record boundary


class TarFormatError(ValueError):
    def __init__(self, msg: str, member: str | None = None) -> None:
        super().__init__(msg)
        self.member = member  # the member being read when the stream broke, if any


REGULAR = (b"0", b"\0", b"7")


@dataclass
class RawEntry:
    name: str
    size: int
    header: bytes  # GNU long-name / PAX blocks, then the member's own header block
    body: bytes  # data, padded to whole blocks (empty when skipped: oversize or not a file)
    typeflag: bytes = b"0"
    skipped: bool = False  # body not read: larger than max_size

    @property
    def is_file(self) -> bool:
        return self.typeflag in REGULAR

    @property
    def data(self) -> bytes:
        return self.body[: self.size]

    @property
    def nbytes(self) -> int:
        return len(self.header) + len(self.body)


def _read_exact(f: BinaryIO, n: int, member: str | None = None) -> bytes:
    data = f.read(n)
    if len(data) != n:
        where = f"inside member {member!r}" if member else "inside a header"
        raise TarFormatError(f"truncated tar: ends {where} ({len(data)} of {n} bytes)", member)
    return data


def _skip(f: BinaryIO, n: int, member: str) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise TarFormatError(f"truncated tar: ends inside member {member!r}", member)
        n -= len(chunk)


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big") if not field[0] & 0x40 else -1
    s = field.split(b"\0", 1)[0].strip()
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise TarFormatError(f"corrupt tar header: bad {what} field {field!r}") from None


def _check(header: bytes) -> None:
    stored = _octal(header[148:156], "checksum")
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != actual:
        raise TarFormatError("corrupt tar header: checksum mismatch (not a tar, or damaged)")


def _pax_records(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        rec = data[sp + 1: pos + length - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


def scan(f: BinaryIO, max_size: int | None = None) -> Iterator[RawEntry]:
    """Yield the members of a tar stream (directories skipped) with their raw blocks.

    Raises :class:`TarFormatError` on a bad header, a stream that ends inside a header or a
    member, or one that ends without tar's end-of-archive blocks (a truncated tar).
    """
    pending: list[bytes] = []
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = f.read(BLOCK)
        if not header:
            raise TarFormatError("truncated tar: ends without the end-of-archive blocks")
        if len(header) != BLOCK:
            raise TarFormatError("truncated tar: ends inside a header block")
        if header == b"\0" * BLOCK:
            return
        _check(header)
        size = _octal(header[124:136], "size")
        typeflag = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag in (b"L", b"x", b"g"):
            body = _read_exact(f, padded)
            if typeflag == b"L":
                long_name = body[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif typeflag == b"x":
                pax = _pax_records(body[:size])
            if typeflag != b"g":
                pending.append(header + body)
            continue
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            size = int(pax["size"])
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        prefix_blocks = b"".join(pending)
        pending, long_name, pax = [], None, {}
        if typeflag in (b"1", b"2", b"3", b"4", b"6"):  # links and devices carry no data
            yield RawEntry(name, 0, prefix_blocks + header, b"", typeflag)
            continue
        if typeflag == b"5" or (max_size is not None and size > max_size) or typeflag not in REGULAR:
            _skip(f, padded, name)
            if typeflag != b"5":
                yield RawEntry(name, size, prefix_blocks + header, b"", typeflag, skipped=True)
            continue
        body = _read_exact(f, padded, name)
        yield RawEntry(name, size, prefix_blocks + header, body, typeflag)


def final_size(nbytes: int) -> int:
    """Size of a tar holding ``nbytes`` of member blocks once closed (end blocks, record padding)."""
    total = nbytes + 2 * BLOCK
    return total + (RECORD - total % RECORD) % RECORD


class RawTarWriter:
    """Append raw member blocks to a binary file; md5 and size of what was written.

    The md5 runs on a helper thread (hashlib releases the GIL on large buffers), so hashing
    overlaps reading and writing instead of adding to them.
    """

    def __init__(self, f: Any) -> None:
        import queue
        import threading

        self.f = f
        self.md5 = hashlib.md5()
        self.size = 0
        self._q: queue.Queue = queue.Queue(maxsize=256)
        self._t = threading.Thread(target=self._hash, name="tar-md5", daemon=True)
        self._t.start()

    def _hash(self) -> None:
        while True:
            b = self._q.get()
            if b is None:
                return
            self.md5.update(b)

    def write_raw(self, *parts: bytes) -> None:
        for b in parts:
            self.f.write(b)
            self._q.put(b)
            self.size += len(b)

    def close(self) -> None:
        # two zero blocks end the archive; pad to a whole record like tar does
        end = 2 * BLOCK
        total = self.size + end
        end += (RECORD - total % RECORD) % RECORD
        self.write_raw(b"\0" * end)
        self._q.put(None)
        self._t.join()

    def abort(self) -> None:
        self._q.put(None)
        self._t.join()
