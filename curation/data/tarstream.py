"""A minimal, fast tar scanner for reading members verbatim (resharding copies them; see verified_copy).

Resharding copies kept samples unchanged. Re-creating headers with ``tarfile`` costs more
than moving the bytes, so this module yields each member's raw blocks (its header, any GNU
long-name or PAX blocks before it, its data and padding), which ``curation/selection/verified_copy.py``
writes back as they were: the output members are byte-identical to the input members,
headers included. The shard reader uses the same scanner, so both see a tar the same way.

Regular files, GNU long names (``L``, ``K``) and PAX extended headers (``x``, ``g``) are
understood; directories are skipped; links and devices are reported (``typeflag``) with no
data.

The scanner terminates on any input: every loop consumes at least one block, or one PAX
record, of the stream. Anything malformed raises :class:`TarFormatError`, naming the member
(when its header can be trusted to say which) and the field: a bad header checksum; a size
that is not octal, not a valid base-256 number, or negative; a PAX record whose length is
not a number, too short, or past the end of the header; a PAX ``size`` that is not a
number; an extended header above 1 MiB; a stream that ends inside a header or a member;
a truncated or corrupt gzip stream. A stream that ends cleanly at a member boundary without
tar's end-of-archive blocks is complete as far as anyone can tell: it ends without error.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor; archives end on a record boundary
ZERO_BLOCK = b"\0" * BLOCK
# GNU long names and PAX headers are read into memory: a larger one is refused
MAX_EXTENDED_HEADER = 1 << 20
_CHUNK = 8 << 20  # a declared size is never allocated at once: reads go by chunks of this
_DIGITS = re.compile(rb"[0-9]{1,20}")
_OCTAL = re.compile(rb"[0-7]*")
# a compressed stream that is cut or damaged raises these from read()
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class TarFormatError(ValueError):
    def __init__(self, msg: str, member: str | None = None) -> None:
        super().__init__(msg)
        self.member = member  # the member being read when the stream broke, if any


REGULAR = (b"0", b"\0", b"7")
EXTENDED = (b"L", b"K", b"x", b"g")  # blocks that describe the next member, or the archive
NO_DATA = (b"1", b"2", b"3", b"4", b"6")  # links and devices


@dataclass
class RawEntry:
    name: str
    size: int
    header: bytes  # GNU long-name / PAX blocks, then the member's own header block
    body: bytes  # data, padded to whole blocks (empty when skipped: oversize or not a file)
    typeflag: bytes = b"0"
    skipped: bool = False  # body not read: larger than max_size
    offset: int = -1  # byte offset in the stream of the member's first block (extended headers included)
    end: int = -1  # byte offset just past its padded data

    @property
    def is_file(self) -> bool:
        return self.typeflag in REGULAR

    @property
    def data(self) -> bytes:
        return self.body[: self.size]

    @property
    def nbytes(self) -> int:
        return len(self.header) + len(self.body)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


class _Stream:
    """Reads of a tar stream that count bytes and turn compression errors into truncation."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.offset = 0

    def read(self, n: int, member: str | None = None) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream), read in bounded chunks:
        a header that declares a huge size costs only what the stream really holds."""
        chunks, got = [], 0
        while got < n:
            try:
                chunk = self.f.read(min(n - got, _CHUNK))
            except _STREAM_ERRORS as e:
                where = f"inside member {member!r}" if member else f"at byte {self.offset + got} of the tar"
                raise TarFormatError(f"truncated or corrupt compressed stream {where}: {e}", member) from None
            if not chunk:
                break
            if len(chunk) == n:  # the usual case: one read, no copy
                self.offset += n
                return chunk
            chunks.append(chunk)
            got += len(chunk)
        self.offset += got
        return b"".join(chunks)

    def exact(self, n: int, member: str | None, what: str = "") -> bytes:
        data = self.read(n, member)
        if len(data) != n:
            where = f"inside {what or 'member'} {member!r}" if member else f"inside {what or 'a member'}"
            raise TarFormatError(f"truncated tar: ends {where} ({len(data)} of {n} bytes)", member)
        return data

    def skip(self, n: int, member: str, seek: bool = False) -> None:
        """Move past ``n`` bytes of ``member``: by seeking when asked and the file can (the last
        byte is still read, so a stream cut inside the member is caught), else by reading."""
        if seek and n and getattr(self.f, "seekable", lambda: False)():
            try:
                self.f.seek(n - 1, 1)
            except _STREAM_ERRORS as e:  # a gzipped shard seeks by decompressing
                raise TarFormatError(f"truncated or corrupt compressed stream inside member {member!r}: {e}",
                                     member) from None
            self.offset += n - 1
            n = 1
        while n > 0:
            got = len(self.read(min(n, _CHUNK), member))
            if not got:
                raise TarFormatError(f"truncated tar: ends inside member {member!r}", member)
            n -= got


def _number(field: bytes, what: str, member: str | None) -> int:
    """A numeric header field: octal digits (NUL/space terminated) or GNU base-256."""
    if field and field[0] in (0x80, 0xFF):  # GNU base-256: 0x80 positive, 0xff negative (two's complement)
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        return value
    s = field.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(s):
        kind = "base-256 number" if field and field[0] & 0x80 else "octal number"
        raise TarFormatError(f"corrupt tar header{_of(member)}: {what} field {field!r} is not a valid {kind}", member)
    return int(s or b"0", 8)


def _of(member: str | None) -> str:
    return f" of member {member!r}" if member else ""


def _size_field(header: bytes, member: str | None) -> int:
    size = _number(header[124:136], "size", member)
    if size < 0:
        raise TarFormatError(f"corrupt tar header{_of(member)}: negative size {size} in the size field", member)
    return size


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip(b" ")
    if not stored or not _OCTAL.fullmatch(stored):
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if int(stored, 8) == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)  # some old tars sum signed chars
    return int(stored, 8) == signed


def _header_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field extends the name
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix:
            name = f"{prefix}/{name}"
    return name


def _trusted_name(header: bytes) -> str | None:
    """The name in a header that failed its checksum, if the header still looks like one:
    ``ustar`` magic, not an extended header, a non-empty printable UTF-8 name. Lets the
    error land on the member the damage belongs to instead of the sample before it."""
    if len(header) < 263 or header[257:262] != b"ustar" or header[156:157] in EXTENDED:
        return None
    try:
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if name and name.isprintable() else None


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse PAX ``"<length> <key>=<value>\\n"`` records; ValueError says what is wrong."""
    out: dict[str, str] = {}
    pos, n = 0, len(data)
    while pos < n:
        if not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp] if sp >= 0 else data[pos:pos + 20]
        if sp < 0 or not _DIGITS.fullmatch(digits):
            raise ValueError(f"record at byte {pos}: length {digits!r} is not a number")
        length = int(digits)
        end = pos + length
        if length < len(digits) + 4:  # "<n> k=\n" at the least
            raise ValueError(f"record at byte {pos}: length {length} is too short")
        if end > n:
            raise ValueError(f"record at byte {pos}: length {length} runs past the end of the header ({n} bytes)")
        if data[end - 1] != 0x0A:
            raise ValueError(f"record at byte {pos} does not end with a newline")
        key, eq, value = data[sp + 1: end - 1].partition(b"=")
        if not eq or not key:
            raise ValueError(f"record at byte {pos} has no keyword=value")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


@dataclass
class _Pending:
    """Extended headers read so far that describe the next member."""

    blocks: list[bytes]
    long_name: str | None = None
    pax: dict[str, str] | None = None
    error: str | None = None  # a malformed extended header, reported against the member it precedes

    def name(self, header_name: str) -> str:
        if self.pax and self.pax.get("path"):
            return self.pax["path"]
        return self.long_name if self.long_name else header_name


def _read_extended(s: _Stream, header: bytes, typeflag: bytes, size: int, pending: _Pending) -> None:
    """Consume a GNU long-name or PAX block and record what it says (or what is wrong with it)."""
    if size > MAX_EXTENDED_HEADER:
        s.skip(_padded(size), _header_name(header))
        pending.error = pending.error or f"extended header ({typeflag.decode('latin-1')}) of {size} bytes, above the " \
                                         f"{MAX_EXTENDED_HEADER}-byte limit"
        return
    body = s.exact(_padded(size), None, "an extended header")
    if typeflag == b"L":
        pending.long_name = body[:size].rstrip(b"\0").decode("utf-8", "surrogateescape") or None
    elif typeflag == b"x":
        try:
            pending.pax = _pax_records(body[:size])
        except ValueError as e:
            pending.error = pending.error or f"bad PAX extended header: {e}"
    if typeflag != b"g":  # a global header belongs to the archive, not to the member
        pending.blocks.append(header + body)


def _member_size(header: bytes, name: str, pending: _Pending) -> int:
    size = _size_field(header, name)
    pax_size = (pending.pax or {}).get("size")
    if pax_size is not None:
        if not _DIGITS.fullmatch(pax_size.encode("utf-8", "surrogateescape")):
            raise TarFormatError(f"corrupt PAX header of member {name!r}: size record {pax_size!r} is not a number",
                                 name)
        size = int(pax_size)
    return size


def _read_header(s: _Stream, pending: _Pending) -> bytes | None:
    """The next header block; None at the end of the archive (zero block, or a clean end of
    the stream at a member boundary)."""
    start = s.offset
    header = s.read(BLOCK)
    if len(header) < BLOCK or header == ZERO_BLOCK:
        if not header.strip(b"\0"):  # end blocks, possibly cut, or none at all
            if start == 0 and not header:
                raise TarFormatError("empty shard (0 bytes)")
            if pending.blocks or pending.error:
                name = pending.name("") or None
                raise TarFormatError("truncated tar: ends after the extended header of "
                                     + (f"member {name!r}" if name else "a member"), name)
            return None
        name = pending.name("") or _trusted_name(header)
        raise TarFormatError(f"truncated tar: ends inside the header block at byte {start}"
                             + (f" of member {name!r}" if name else ""), name)
    if not _checksum_ok(header):
        name = pending.name("") or _trusted_name(header)
        what = "the first header" if start == 0 else f"the header at byte {start}"
        raise TarFormatError(f"corrupt tar header: checksum mismatch in {what}"
                             + (f" (member {name!r})" if name else " (not a tar, or damaged)"), name)
    return header


def scan(f: BinaryIO, max_size: int | None = None, skip: Callable[[str], bool] | None = None) -> Iterator[RawEntry]:
    """Yield the members of a tar stream (directories skipped) with their raw blocks.

    A member larger than ``max_size``, or one whose name ``skip`` is true of, comes with no body
    (``skipped``); ``skip``'s are seeked past when the file can seek (a reader of samples without
    media: :mod:`curation.data.keyscan`). Raises :class:`TarFormatError` on a malformed header or
    a stream that ends inside a header or a member, after yielding every member before it.
    """
    s = _Stream(f)
    pending = _Pending([])
    start = 0
    while True:
        if not pending.blocks:
            start = s.offset
        header = _read_header(s, pending)
        if header is None:
            return
        typeflag = header[156:157]
        if typeflag in EXTENDED:
            _read_extended(s, header, typeflag, _size_field(header, pending.name("") or None), pending)
            continue
        name = pending.name(_header_name(header))
        if pending.error:
            raise TarFormatError(f"corrupt tar header of member {name!r}: {pending.error}", name)
        if not name:
            raise TarFormatError(f"corrupt tar header: member at byte {s.offset - BLOCK} has an empty name")
        size = _member_size(header, name, pending)
        head = b"".join(pending.blocks) + header
        pending = _Pending([])
        if typeflag in NO_DATA:  # links and devices carry no data
            yield RawEntry(name, 0, head, b"", typeflag, offset=start, end=s.offset)
            continue
        passed = skip is not None and typeflag in REGULAR and skip(name)
        if typeflag == b"5" or typeflag not in REGULAR or (max_size is not None and size > max_size) or passed:
            s.skip(_padded(size), name, seek=passed)
            if typeflag != b"5":
                yield RawEntry(name, size, head, b"", typeflag, skipped=True, offset=start, end=s.offset)
            continue
        body = s.exact(_padded(size), name)
        yield RawEntry(name, size, head, body, typeflag, offset=start, end=s.offset)


def final_size(nbytes: int) -> int:
    """Size of a tar holding ``nbytes`` of member blocks once closed (end blocks, record padding)."""
    total = nbytes + 2 * BLOCK
    return total + (RECORD - total % RECORD) % RECORD
