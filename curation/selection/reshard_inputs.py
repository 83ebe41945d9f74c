"""Input shards of a reshard: refused early when gone, verified as they are read, scanned into samples.

``inp`` below is a ``curation.selection.reshard.InputShard`` (url, dataset, shard, checksum).
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterable, Iterator

from curation.data import storage
from curation.data.shards import split_key, unsafe_name
from curation.data.records import checksum_algo, format_checksum
from curation.data.tarstream import scan
from curation.selection.verified_copy import Piece, VerifiedInput


class ReshardError(RuntimeError):
    """Resharding cannot go on; the message names the input shard or group."""


def _changed(inp: Any, now: str) -> ReshardError:
    return ReshardError(f"input shard {inp.url} ({inp.dataset}/{inp.shard}) changed since it was scored "
                        f"(checksum {inp.checksum} then, {now} now); score it again")


def _missing(inp: Any) -> ReshardError:
    return ReshardError(f"input shard {inp.url} ({inp.dataset}/{inp.shard}) no longer exists")


def _is_md5(checksum: str) -> bool:
    return len(checksum) == 32 and all(c in "0123456789abcdef" for c in checksum)


def open_input(inp: Any, storage_options: dict | None) -> Any:
    """Open an input shard for one verified pass; on a store, refuse at once if its ETag moved."""
    fs, path = storage.get_fs(inp.url, storage_options)
    try:
        if not storage.is_remote(inp.url):
            return open(path, "rb", buffering=0)  # plain reads of CHUNK bytes, no copy through a buffer
        fs.invalidate_cache(path)
        with storage.naming(inp.url):
            etag = str(fs.info(path).get("ETag") or "").strip('"')
        if etag and etag != inp.checksum:
            raise _changed(inp, etag)
        return storage.open_url(inp.url, "rb", storage_options)  # its read errors name the object
    except FileNotFoundError:
        raise _missing(inp) from None


def input_reader(inp: Any, f: BinaryIO) -> VerifiedInput:
    """The verified stream over an opened input, hashing with the hash its checksum was made with."""
    return VerifiedInput(f, algo=checksum_algo(inp.checksum))


def verify_input(inp: Any, src: VerifiedInput) -> int:
    """Read and hash the rest of the input; refuse it if its hash is not the one scored. Its size."""
    size, digest = src.finish()
    now = format_checksum(src.algo, digest)
    if (_is_md5(inp.checksum) or not storage.is_remote(inp.url)) and now != inp.checksum:
        raise _changed(inp, now)  # on a store a multipart ETag is no md5: the ETag check at open covers it
    return size


def _refusal(name: str, is_file: bool) -> str | None:
    """Why a member must never be written into a curated shard, even in a sample a policy keeps."""
    if not is_file:
        return f"unsupported tar member type for {name!r} (links and devices are refused)"
    return unsafe_name(name)


Run = tuple[str, "str | None", list[Piece]]  # members of one key that follow one another: (key, why not, pieces)
Sample = tuple[str, list[Piece], "str | None"]  # (key, pieces of its members' raw blocks, why it must not be written)


def sample_key(name: str) -> str:
    """A member's sample key, as the shard reader groups it (``split_key``: up to the first dot of
    the base name; the whole name when there is none)."""
    parts = split_key(name)
    return parts[0] if parts else name


def tar_samples(src: VerifiedInput) -> Iterator[Sample]:
    """(key, pieces of its members' raw blocks, why it must not be written) per sample, in tar order.

    The same scanner and the same key rules as the shard reader, so both see the same samples.
    """

    def runs() -> Iterator[Run]:
        for e in scan(src):
            yield (sample_key(e.name), _refusal(e.name, e.is_file),
                   src.last(e.nbytes, e.header) or [(e.header + e.body, 0, e.nbytes)])
            src.release()

    return group_samples(runs())


def group_samples(runs: Iterable[Run]) -> Iterator[Sample]:
    """Runs of members -> samples by the shard reader's key rules: contiguous members of one key
    form a sample, a key that comes back after another is skipped (as the reader skips it), and
    the first refused member marks its sample (its pieces, and those after it, are not taken).
    A run is one member (the full scanner) or several adjacent members of one key (the fast path,
    ``plain_tar``); its pieces are taken while the scanner still stands on it."""
    key: str | None = None
    pieces: list[Piece] = []
    why: str | None = None
    seen: set[str] = set()
    for k, refused, taken in runs:
        if k != key:
            if k in seen:
                continue
            if key is not None:
                yield key, pieces, why
            key, pieces, why = k, [], None
            seen.add(k)
        if why is None:
            why = refused
            if why is None:
                pieces.extend(taken)
    if key is not None:
        yield key, pieces, why


def stat_inputs(inputs: list[Any], storage_options: dict | None = None) -> dict[str, int]:
    """Each input's size, from one listing per folder (no bytes read). Refuses, before anything
    is written, inputs that are gone and, on object stores, inputs whose ETag moved."""
    by_dir: dict[str, list[Any]] = {}
    for inp in inputs:
        by_dir.setdefault(storage.dirname(inp.url), []).append(inp)
    sizes: dict[str, int] = {}
    for folder, items in sorted(by_dir.items()):
        fs, path = storage.get_fs(folder, storage_options)
        fs.invalidate_cache(path)
        try:
            listing = {storage.basename(e["name"]): e for e in fs.ls(path, detail=True)}
        except FileNotFoundError:
            listing = {}
        for inp in items:
            entry = listing.get(storage.basename(inp.url))
            if entry is None:
                raise _missing(inp)
            etag = str(entry.get("ETag") or "").strip('"')
            if storage.is_remote(inp.url) and etag and etag != inp.checksum:
                raise _changed(inp, etag)
            sizes[inp.url] = int(entry["size"])
    return sizes
