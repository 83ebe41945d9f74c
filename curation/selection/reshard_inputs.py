"""Input shards of a reshard: refused early when gone, verified as they are read, scanned into samples.

``inp`` below is a ``curation.selection.reshard.InputShard`` (url, dataset, shard, checksum).
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO, Callable, Iterator

from curation.data import storage
from curation.data.shards import split_key, unsafe_name
from curation.data.records import checksum_algo, format_checksum
from curation.data.tarstream import TarFormatError, scan
from curation.selection.sample_spans import Run, Sample, Span, group_samples, kept_parts, one_sample
from curation.selection.verified_copy import VerifiedInput

log = logging.getLogger(__name__)


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


def group_keys(g: Any, storage_options: dict | None) -> dict[str, list[str]]:
    """Each input's kept keys (``g``: a ``reshard.Group``): given, or read from the decision table
    for this group alone."""
    keys = {i.shard: i.kept for i in g.inputs if i.decisions is None}
    by_table: dict[str, list[str]] = {}
    for i in g.inputs:
        if i.decisions is not None:
            by_table.setdefault(i.decisions, []).append(i.shard)
    if by_table:
        from curation.selection.kept import load_kept

        for table, shards in by_table.items():
            keys.update(load_kept(table, g.dataset, shards, storage_options))
    return keys


def kept_spans(g: Any, storage_options: dict | None, sizes: dict[str, int], refused: list[dict[str, str]],
               scanner: Callable[[VerifiedInput], Iterator[Sample | Span]]) -> Iterator[tuple[str, Span]]:
    """(input shard, span) of the kept samples of a group's inputs, in input order; each input
    verified as it is read: one whose bytes are not the ones scored raises once read to its end,
    before the group commits anything. Kept samples that must not be written go to ``refused``."""
    kept = group_keys(g, storage_options)
    for inp in g.inputs:
        keep = set(kept[inp.shard])
        found = 0
        f = open_input(inp, storage_options)
        src = input_reader(inp, f)
        try:
            try:
                for item in scanner(src):
                    if type(item) is Span:
                        marks = [k in keep for k in item.keys]
                        found += sum(marks)
                        for part in kept_parts(item, marks):
                            yield inp.shard, part
                        continue
                    key, pieces, why = item
                    if key not in keep:
                        continue
                    found += 1
                    if why:
                        refused.append({"dataset": inp.dataset, "shard": inp.shard, "key": key, "reason": why})
                        log.warning("input shard %s: not writing kept sample %r: %s", inp.url, key, why)
                        continue
                    yield inp.shard, one_sample(key, pieces)
            except TarFormatError as e:
                verify_input(inp, src)  # a shard that changed explains a broken tar better than the break does
                raise ReshardError(f"input shard {inp.url}: {e}") from None
            sizes[inp.url] = verify_input(inp, src)
        finally:
            src.close()
            f.close()
        if found != len(keep):
            raise ReshardError(f"input shard {inp.url} has {found} of the {len(keep)} kept samples the scores "
                               f"list; it changed since it was scored")
