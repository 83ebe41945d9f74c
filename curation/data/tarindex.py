"""A tar's regular members from its bytes in large windows: one tight walk over the header
offsets, then every header field checked at once with numpy.

This is :mod:`curation.data.keyscan`'s fast path (samples without media). A local shard is
read through a memory map (only the pages holding headers and wanted bodies are touched); a
remote one (s3fs, fsspec) in windows of :data:`WINDOW` bytes, so an object store sees a few large
range reads, not a request per header, and a member larger than a window is seeked past. The
walk itself only reads each header's size field to find the next header; the rest is read from
all the headers of a window (or :data:`STRIDE` bytes of a map) at once: checksums, type flags,
size fields, ustar prefixes, names, and the PAX headers webdataset writes before every member
(one record naming neither path nor size). PAX headers of any other shape and GNU long names are
parsed one by one, as :mod:`curation.data.tarstream` parses them.

Whatever this path does not handle the way :func:`curation.data.tarstream.scan` does (a link, a
base-256 size, a checksum that does not add up, a PAX ``size``, a cut, ...) makes :func:`members`
return None: the caller then reads the shard with the streaming scanner, which reports the damage
on the member it hits. So on any shard the two give the same members, or this one gives none.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from curation.data import tarstream as ts

BLOCK = ts.BLOCK
WINDOW = 16 << 20  # bytes per read of a remote shard
STRIDE = 16 << 20  # bytes of a memory-mapped shard walked before their headers are checked
_GATHER = 8192  # headers checked at once (4 MiB of header blocks)
_POS100 = np.arange(100)
_REGULAR = (48, 0, 55)  # "0", NUL, "7"
_ALLOWED = np.array([48, 0, 55, 53, 120, 76], dtype=np.uint8)  # regular, "5" (directory), "x" (PAX), "L"
_USTAR = np.frombuffer(b"ustar\0", dtype=np.uint8)


def _size_of(field: bytes) -> int:
    """A size field as tarstream reads it (up to a NUL, spaces stripped, octal); -1 if not."""
    sz = field.split(b"\0", 1)[0].strip(b" ")
    if not sz.isdigit():
        return -1
    try:
        return int(sz, 8)
    except ValueError:  # an 8 or a 9
        return -1


def _walk(buf: Any, off: int, stop: int, steps: dict[bytes, int]) -> tuple[list[int], int, bool]:
    """Header offsets from ``off`` while a whole header lies before ``stop``; the offset after the
    last, and whether the walk stopped at a block that starts with a NUL and has no size (the end,
    or damage). Empty offsets and a negative next offset: a size field this path does not read."""
    heads: list[int] = []
    append, get, last = heads.append, steps.get, stop - BLOCK
    while off <= last:
        sz = buf[off + 124:off + 136]
        step = get(sz)
        if step is None:
            n = _size_of(sz)
            if n < 0:  # an end block has no size; a header with an empty name is checked with the rest
                return (heads, off, True) if not buf[off] else ([], -1, False)
            step = steps[sz] = BLOCK + (n + BLOCK - 1) // BLOCK * BLOCK
        append(off)
        off += step
    return heads, off, False


def _octal(fields: np.ndarray) -> tuple[bool, np.ndarray]:
    """Numeric header fields (rows of bytes) read as tarstream reads them: up to the first NUL,
    spaces stripped, octal digits; (all of them valid, their values). Fields as tar writers lay
    them out ("0000644\\0", "%06o\\0 " checksums) are read at once; the rest one at a time."""
    width = fields.shape[1]
    lead = width - 1 - (fields[:, -1] == 32)  # digits before the NUL (and a checksum's space)
    std = ((fields[:, :width - 2] >= 48) & (fields[:, :width - 2] <= 55)).all(axis=1)
    std &= np.where(lead == width - 1, (fields[:, -2] >= 48) & (fields[:, -2] <= 55) & (fields[:, -1] == 0),
                    fields[:, -2] == 0)
    values = np.zeros(len(fields), dtype=np.int64)
    for n in (width - 2, width - 1):
        rows = std & (lead == n)
        if rows.any():
            values[rows] = (fields[rows, :n].astype(np.int64) - 48) @ (8 ** np.arange(n - 1, -1, -1, dtype=np.int64))
    for i in np.flatnonzero(~std).tolist():
        got = _size_of(fields[i].tobytes())
        if got < 0:
            return False, values
        values[i] = got
    return True, values


_OK_TYPE = np.zeros(256, dtype=bool)
_OK_TYPE[_ALLOWED] = True
_IS_REGULAR = np.zeros(256, dtype=bool)
_IS_REGULAR[list(_REGULAR)] = True
def _fields(view: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Type flags and sizes of the header blocks ``rows`` of ``view``, and the names of the
    regular members among them (rows of 100 bytes, NULs after the first); None when a checksum
    does not add up (unsigned, as tar writes it) or a type or field is not this path's."""
    tfs, sizes, names = [], [], []
    for lo in range(0, len(rows), _GATHER):
        blocks = view[rows[lo:lo + _GATHER]]
        chk = blocks[:, 148:156]
        ok, stored = _octal(chk)
        sums = blocks.sum(axis=1, dtype=np.uint32).astype(np.int64) - chk.sum(axis=1, dtype=np.int64) + 8 * 32
        tf = blocks[:, 156]
        if not ok or not np.array_equal(sums, stored) or not _OK_TYPE[tf].all():
            return None
        prefixed = blocks[:, 345] != 0
        if prefixed.any() and (blocks[prefixed, 257:263] == _USTAR).all(axis=1).any():
            return None  # a ustar prefix field extends the name: the slow path
        ok, size = _octal(blocks[:, 124:136])
        if not ok:
            return None
        if not blocks[(tf != 120) & (tf != 76), 0].all():
            return None  # a member with an empty name (or one a PAX path or long name gives)
        name = blocks[_IS_REGULAR[tf], :100]
        zero = name == 0
        cut = np.where(zero.any(axis=1), zero.argmax(axis=1), 100)
        odd = np.flatnonzero((100 - zero.sum(axis=1)) != cut)  # bytes after the first NUL: not the name
        if len(odd):
            name[odd] = np.where(_POS100 < cut[odd, None], name[odd], 0)
        tfs.append(tf)
        sizes.append(size)
        names.append(name)
    return np.concatenate(tfs), np.concatenate(sizes), np.concatenate(names)


def _plain_pax(view: np.ndarray, rows: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Which PAX headers (at block ``rows``, bodies of ``sizes``) are one record naming neither
    path nor size, "<n> <key>=<value>\\n" with n the whole body (webdataset writes "NN mtime=...\\n")."""
    out = np.zeros(len(rows), dtype=bool)
    small = np.flatnonzero((sizes <= BLOCK) & (rows + 1 < len(view)))  # longer ones are read one by one
    if not len(small):
        return out
    bodies = view[:, :int(sizes[small].max())][rows[small] + 1]
    for n in np.unique(sizes[small]).tolist():
        lead = b"%d " % n
        if n < len(lead) + 3:
            continue
        at = np.flatnonzero(sizes[small] == n)
        body = bodies[at, :n]
        eq = body == 61
        key_len = np.where(eq.any(axis=1), eq.argmax(axis=1), 0) - len(lead)
        named = np.zeros(len(at), dtype=bool)
        if n >= len(lead) + 5:
            key4 = body[:, len(lead):len(lead) + 4]
            named = (key_len == 4) & ((key4 == np.frombuffer(b"path", np.uint8)).all(axis=1)
                                      | (key4 == np.frombuffer(b"size", np.uint8)).all(axis=1))
        out[small[at]] = ((body[:, :len(lead)] == np.frombuffer(lead, np.uint8)).all(axis=1)
                          & (key_len > 0) & ~named & (body[:, -1] == 10) & ~(body[:, :-1] == 10).any(axis=1))
    return out


class _Pending:
    """What the extended headers read so far say of the next member (tarstream's rules: the last
    PAX header's records and the last GNU long name count)."""

    __slots__ = ("pax", "long", "any")

    def __init__(self) -> None:
        self.pax: dict[str, str] | None = None
        self.long: str | None = None
        self.any = False


class Found:
    """The regular members of a tar, in order: names (rows of 100 bytes, NUL-padded) unless a PAX
    path or GNU long name gave another (``renamed``: member number -> name), sizes, and the bodies
    the caller wanted (``kept``; None for the others)."""

    def __init__(self, names: np.ndarray, sizes: np.ndarray, renamed: dict[int, str], bodies: list[bytes | None],
                 kept: np.ndarray) -> None:
        self.names, self.sizes, self.renamed, self.bodies, self.kept = names, sizes, renamed, bodies, kept

    def __len__(self) -> int:
        return len(self.sizes)

    def name(self, i: int) -> str:
        got = self.renamed.get(i)
        return got if got is not None else self.names[i].tobytes().rstrip(b"\0").decode("utf-8", "surrogateescape")


Want = Callable[[np.ndarray, np.ndarray, dict[int, str]], np.ndarray]


class _Index:
    """The walk's state across windows, and the members found so far."""

    def __init__(self, want: Want) -> None:
        self.want, self.steps, self.pending = want, {}, _Pending()
        self.names: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []
        self.renamed: dict[int, str] = {}
        self.bodies: list[bytes | None] = []
        self.kept: list[np.ndarray] = []
        self.count = 0

    def found(self) -> Found:
        names = np.concatenate(self.names) if self.names else np.zeros((0, 100), np.uint8)
        sizes = np.concatenate(self.sizes) if self.sizes else np.zeros(0, np.int64)
        kept = np.concatenate(self.kept) if self.kept else np.zeros(0, bool)
        return Found(names, sizes, self.renamed, self.bodies, kept)

    def window(self, buf: Any, stop: int, heads: list[int], tail: Callable[[int, int], bytes]) -> bool:
        """Add the members whose headers are at ``heads`` of ``buf`` (bytes before ``stop``);
        ``tail(off, n)`` reads a body that runs past ``stop``. False: the slow path's shard."""
        if not heads:
            return True
        view = np.frombuffer(buf, dtype=np.uint8, count=stop // BLOCK * BLOCK).reshape(-1, BLOCK)
        offs = np.asarray(heads, dtype=np.int64)
        got = _fields(view, offs // BLOCK)
        del view
        if got is None:
            return False
        tf, sizes, names = got
        pax = tf == 120
        plain = np.zeros(len(offs), dtype=bool)
        if pax.any():
            view = np.frombuffer(buf, dtype=np.uint8, count=stop // BLOCK * BLOCK).reshape(-1, BLOCK)
            plain[pax] = _plain_pax(view, offs[pax] // BLOCK, sizes[pax])
            del view
        if ((pax & ~plain) | (tf == 76)).any() or self.pending.pax or self.pending.long:
            renamed = self._one_by_one(buf, stop, offs, tf, sizes, plain)
            if renamed is None:
                return False
        else:
            renamed = {}
            self.pending.any = bool(tf[-1] in (120, 76))
        member = _IS_REGULAR[tf]
        self._add(buf, stop, offs[member], sizes[member], names, renamed, tail)
        return True

    def _add(self, buf: Any, stop: int, offs: np.ndarray, sizes: np.ndarray, names: np.ndarray,
             renamed: dict[int, str], tail: Callable[[int, int], bytes]) -> None:
        bodies: list[bytes | None] = [None] * len(offs)
        kept = np.asarray(self.want(names, sizes, renamed), dtype=bool)
        at = np.flatnonzero(kept)
        for i, start, n in zip(at.tolist(), (offs[at] + BLOCK).tolist(), sizes[at].tolist()):
            bodies[i] = buf[start:start + n] if start + n <= stop else tail(start, n)
        for i, name in renamed.items():
            self.renamed[self.count + i] = name
        self.names.append(names)
        self.sizes.append(sizes)
        self.bodies.extend(bodies)
        self.kept.append(kept)
        self.count += len(offs)

    def _one_by_one(self, buf: Any, stop: int, offs: np.ndarray, tf: np.ndarray, sizes: np.ndarray,
                    plain: np.ndarray) -> dict[int, str] | None:
        """A window with extended headers other than webdataset's, each header in turn: the names
        they give (by regular member of the window), or None for the slow path."""
        p, renamed, member = self.pending, {}, 0
        for i, (off, t, n) in enumerate(zip(offs.tolist(), tf.tolist(), sizes.tolist())):
            if t in (120, 76):
                if n > ts.MAX_EXTENDED_HEADER or off + BLOCK + n > stop:
                    return None
                body = bytes(buf[off + BLOCK:off + BLOCK + n])
                if t == 76:
                    p.long = body.rstrip(b"\0").decode("utf-8", "surrogateescape") or None
                elif plain[i]:
                    p.pax = None
                else:
                    try:
                        p.pax = ts._pax_records(body)
                    except ValueError:
                        return None
                p.any = True
                continue
            pax = p.pax or {}
            if "size" in pax and (not ts._DIGITS.fullmatch(pax["size"].encode("utf-8", "surrogateescape"))
                                  or int(pax["size"]) != n):
                return None  # the walk went by the header's size field
            name = pax.get("path") or p.long or None
            self.pending = p = _Pending()
            if t in _REGULAR:
                if name is not None:
                    renamed[member] = name
                member += 1
        return renamed


def members(f: Any, size: int, want: Want, local: bool, window: int | None = None) -> Found | None:
    """The regular members of the tar ``f`` (``size`` bytes), with the bodies of those that
    ``want(names, sizes, renamed)`` is true of (a window's members at a time, as :class:`Found`
    holds them), or None when the shard is not one this path reads (module docstring).
    ``local``: ``f`` is a local file, read through a memory map; else it is read in windows of
    ``window`` bytes (:data:`WINDOW`)."""
    if size < BLOCK:
        return None
    idx = _Index(want)
    if local:
        import mmap

        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _mapped(mm, size, idx)
        finally:
            try:
                mm.close()
            except BufferError:  # an exception's traceback still holds a view of it: it goes with that
                pass
    return _windows(f, size, idx, window or WINDOW)


def _mapped(mm: Any, size: int, idx: _Index) -> Found | None:
    """The walk over a memory-mapped shard, :data:`STRIDE` bytes of it at a time (the headers are
    checked while the walk has them in the CPU's caches)."""
    off = 0
    while True:
        heads, nxt, at_nul = _walk(mm, off, min(size, off + STRIDE), idx.steps)
        if not 0 <= nxt <= size or not idx.window(mm, size, heads, _no_tail):
            return None
        if at_nul or nxt + BLOCK > size:
            return idx.found() if _ends(mm, size, nxt, at_nul, idx) else None
        off = nxt


def _no_tail(off: int, n: int) -> bytes:
    raise AssertionError("a mapped shard's bodies all lie in the map")


def _ends(buf: Any, stop: int, nxt: int, at_nul: bool, idx: _Index) -> bool:
    """Whether a walk that stopped at ``nxt`` ended the way tarstream ends a good tar: at a zero
    block, or at the end of the file (zeros after it at most); never after an extended header."""
    if idx.pending.any:
        return False
    if at_nul:
        return not buf[nxt:nxt + BLOCK].strip(b"\0")
    return nxt <= stop and not buf[nxt:stop].strip(b"\0")


def _windows(f: Any, size: int, idx: _Index, window: int) -> Found | None:
    """The walk over a remote shard, ``window`` bytes at a time. A member that runs past a window
    starts the next one when it is small (its bytes are read twice: at most 1/16 of a window),
    else its body is seeked past (or, when kept, read on its own)."""
    base = 0
    while True:
        if f.tell() != base:
            f.seek(base)
        buf = f.read(min(window, size - base))
        stop = len(buf)
        if stop < min(window, size - base):
            return None  # the object is shorter than its listing said: the slow path reports it
        heads, nxt, at_nul = _walk(buf, 0, stop, idx.steps)
        if nxt < 0:
            return None
        final = at_nul or base + stop >= size
        if final and nxt > stop:
            return None  # the file ends inside a member
        if not final and heads and nxt > stop and (nxt - heads[-1] <= window // 16 or buf[heads[-1] + 156] in b"xLgK"):
            nxt = heads.pop()  # the last member (or extended header) starts the next window

        def tail(off: int, n: int, base: int = base) -> bytes:
            f.seek(base + off)
            return f.read(n)

        if not idx.window(buf, stop, heads, tail):
            return None
        if final:
            return idx.found() if _ends(buf, stop, nxt, at_nul, idx) else None
        if nxt <= 0:
            return None
        base += nxt
        if base >= size:  # a large last member ends the file, with no end blocks (or past it: cut)
            return idx.found() if base == size and not idx.pending.any else None
