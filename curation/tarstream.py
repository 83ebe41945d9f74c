"""A minimal, fast tar scanner and writer for copying members verbatim.

Resharding copies kept samples unchanged. Re-creating headers with ``tarfile`` costs more
than moving the bytes, so this module reads each member's raw blocks (its header, any GNU
long-name or PAX blocks before it, its data and padding) and writes them back as they were:
the output members are byte-identical to the input members, headers included.

Only what WebDataset shards contain is supported: regular files and directories (skipped),
GNU long names (``L``), PAX extended headers (``x``, ``g``). Anything else, a bad header
checksum or a truncated stream raises :class:`TarFormatError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor; archives end on a record boundary


class TarFormatError(ValueError):
    pass


@dataclass
class RawEntry:
    name: str
    size: int
    header: bytes  # GNU long-name / PAX blocks, then the member's own header block
    body: bytes  # data, padded to whole blocks

    @property
    def data(self) -> bytes:
        return self.body[: self.size]

    @property
    def nbytes(self) -> int:
        return len(self.header) + len(self.body)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarFormatError(f"truncated tar: wanted {n} bytes, got {len(data)}")
    return data


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
        raise TarFormatError("corrupt tar header: checksum mismatch")


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


def scan(f: BinaryIO) -> Iterator[RawEntry]:
    """Yield the regular-file members of a tar stream with their raw blocks."""
    pending: list[bytes] = []
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = f.read(BLOCK)
        if not header:
            return  # no end-of-archive blocks: accept, like tar does with a warning
        if len(header) != BLOCK:
            raise TarFormatError("truncated tar: partial header block")
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
        if typeflag == b"5":
            _read_exact(f, padded)
            continue
        if typeflag not in (b"0", b"\0", b"7"):
            raise TarFormatError(f"unsupported tar member type {typeflag!r} for {name!r}")
        body = _read_exact(f, padded)
        yield RawEntry(name, size, prefix_blocks + header, body)


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
