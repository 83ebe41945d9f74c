"""Members -> samples -> spans: what resharding hands its writer.

A scanner gives runs of members (:data:`Run`: adjacent members of one key); :class:`Grouper`
joins them into samples by the shard reader's key rules (contiguous members of one key form a
sample, a key that comes back after another is skipped, the first refused member marks its
sample). A :class:`Span` is a stretch of consecutive samples of one input, all clean, each a key
seen for the first time, lying end to end in the input: the writer copies it as one byte range
(one ``write`` and one md5 update per read buffer, not per sample) and does per-sample work only
where it cuts an output shard (``verified_copy.GroupWriter.write``). The fast path
(``plain_tar``) gives whole batches of runs (about 85 samples of the bench's corpus);
:func:`group_batches` turns the middle of each batch into one span when nothing in it needs a
sample-by-sample look, and its edges (a sample that may go on in the next batch) into samples.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, NamedTuple

Piece = tuple[Any, int, int]  # (buffer, start, end): bytes of an output member, in a buffer that was hashed
Run = tuple[str, "str | None", list[Piece]]  # members of one key that follow one another: (key, why not, pieces)
Sample = tuple[str, list[Piece], "str | None"]  # (key, pieces of its members' raw blocks, why it must not be written)
BatchRun = tuple[str, "str | None", int, int]  # a run as the fast path reads it: (key, why not, start, end) in the input
Batch = tuple[list[BatchRun], Callable[[int, int], list[Piece]]]  # runs, and the pieces of a byte range of them


class Span(NamedTuple):
    """Consecutive samples: sample ``i`` is ``keys[i]``, bytes ``[bounds[i], bounds[i + 1])`` of
    ``pieces`` (which hold bytes ``[bounds[0], bounds[-1])``, in order)."""

    keys: list[str]
    bounds: list[int]
    pieces: list[Piece]


def cut(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    """The bytes ``[start, stop)`` of what ``pieces`` hold, counted from their first byte."""
    out: list[Piece] = []
    at = 0
    for buf, lo, hi in pieces:
        a, b = max(lo, lo + start - at), min(hi, lo + stop - at)
        if a < b:
            out.append((buf, a, b))
        at += hi - lo
        if at >= stop:
            break
    return out


def one_sample(key: str, pieces: list[Piece]) -> Span:
    return Span([key], [0, sum(hi - lo for _, lo, hi in pieces)], pieces)


def span_samples(span: Span) -> Iterator[Span]:
    """A span's samples, one span each (for the shuffle, which moves samples one by one)."""
    b0 = span.bounds[0]
    for i, key in enumerate(span.keys):
        lo, hi = span.bounds[i] - b0, span.bounds[i + 1] - b0
        yield Span([key], [lo, hi], cut(span.pieces, lo, hi))


def kept_parts(span: Span, keep: list[bool]) -> Iterator[Span]:
    """The stretches of ``span`` whose samples ``keep`` marks, each a span."""
    if all(keep):
        yield span
        return
    b0, i, n = span.bounds[0], 0, len(keep)
    while i < n:
        if not keep[i]:
            i += 1
            continue
        j = i + 1
        while j < n and keep[j]:
            j += 1
        bounds = span.bounds[i:j + 1]
        yield Span(span.keys[i:j], bounds, cut(span.pieces, bounds[0] - b0, bounds[-1] - b0))
        i = j


class Grouper:
    """The shard reader's grouping, one run at a time (:meth:`add`), then :meth:`end`."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.pieces: list[Piece] = []
        self.why: str | None = None
        self.seen: set[str] = set()

    def add(self, k: str, refused: str | None, taken: list[Piece]) -> Sample | None:
        """Take one run; the sample it ends, if any."""
        done = None
        if k != self.key:
            if k in self.seen:
                return None
            done = self.end()
            self.key, self.pieces, self.why = k, [], None
            self.seen.add(k)
        if self.why is None:
            self.why = refused
            if refused is None:
                self.pieces.extend(taken)
        return done

    def end(self) -> Sample | None:
        """The sample being gathered, if any (none after this)."""
        if self.key is None:
            return None
        done = self.key, self.pieces, self.why
        self.key, self.pieces, self.why = None, [], None
        return done


def group_samples(runs: Iterable[Run]) -> Iterator[Sample]:
    """Runs of members -> samples (the full scanner's runs are one member each)."""
    g = Grouper()
    for k, refused, taken in runs:
        done = g.add(k, refused, taken)
        if done is not None:
            yield done
    done = g.end()
    if done is not None:
        yield done


def _middle(runs: list[BatchRun], g: Grouper) -> list[str] | None:
    """The keys of ``runs[1:-1]`` when, ``runs[0]`` taken, they can go as one span: none refused, each
    new, and the run after them new too (so the grouping's state after it is the same either way);
    else None."""
    keys = [r[0] for r in runs[1:-1]]
    new = set(keys)
    last = runs[-1][0]
    if len(new) != len(keys) or last in new or last in g.seen or not g.seen.isdisjoint(new):
        return None
    return keys if all(r[1] is None for r in runs[1:-1]) else None


def group_batches(batches: Iterable[Batch]) -> Iterator[Sample | Span]:
    """What :func:`group_samples` gives for the same runs, a batch at a time, the middle of a batch
    as one :class:`Span` where :func:`_middle` allows (the samples in it are exactly those
    ``group_samples`` would give there, in the same order)."""
    g = Grouper()
    for runs, pieces in batches:
        rest = runs
        if len(runs) >= 3:
            k, why, lo, hi = runs[0]  # it may go on from the last batch's last sample
            done = g.add(k, why, pieces(lo, hi))
            if done is not None:
                yield done
            rest = runs[1:]
            keys = _middle(runs, g)
            if keys is not None:
                done = g.end()
                if done is not None:
                    yield done
                bounds = [r[2] for r in runs[1:-1]] + [runs[-2][3]]
                g.seen.update(keys)
                yield Span(keys, bounds, pieces(bounds[0], bounds[-1]))
                rest = runs[-1:]  # it may go on in the next batch
        for k, why, lo, hi in rest:
            done = g.add(k, why, pieces(lo, hi))
            if done is not None:
                yield done
    done = g.end()
    if done is not None:
        yield done
