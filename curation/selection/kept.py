"""Kept keys read from the decision table as they are needed, never all at once.

Planning a reshard needs, per input shard, how many samples are kept and a fingerprint of which,
and the check that no key is kept twice in a dataset (:func:`scan_kept`: one streamed pass over
the kept rows, in batches, whose memory does not grow with the pool); writing a group needs the
kept keys of its few shards (:func:`load_kept`: a filtered read that skips the row groups of
other shards, the table being sorted by dataset, shard, key).

The duplicate check is an external hash partitioning written here rather than a DuckDB
``GROUP BY dataset, key``: past its memory limit DuckDB's aggregate spilled, but its peak RSS still
grew with the kept keys (+30 MB from 1M to 16M at a 48 MB limit, and 20x the CPU for 4x the keys),
and a lower limit fails it out of memory. Here each kept row's 64-bit hash of (dataset, key) goes to
one of up to ``MAX_PARTS`` temp files by its top bits, sized so a file holds about ``PART_HASHES``
hashes; each file is then sorted on its own, and only hashes seen twice are checked against the
keys themselves (a second pass over their rows), so a hash collision is never reported.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from curation.data import storage
from curation.selection.sqlsafe import literal as lit


PLAN_MEMORY = "32MB"  # the planner's DuckDB streams rows and builds nothing: its buffers fit in this
BATCH_ROWS = 1 << 16  # kept rows a streamed batch holds
PART_HASHES = 1 << 20  # a duplicate-check partition holds about this many 8-byte hashes (8 MB) ...
MAX_PARTS = 256  # ... up to 256M rows; past that the partitions grow (256 open temp files at most)
CHECK_CHUNK = 4096  # repeated hashes checked against the keys per pass


def _con(url: str, storage_options: dict | None) -> Any:
    import duckdb

    con = duckdb.connect(config={"memory_limit": PLAN_MEMORY, "threads": 1, "preserve_insertion_order": True,
                                 "enable_external_file_cache": False})  # a remote file read once is not cached
    con.execute("SET enable_progress_bar = false")
    if storage.is_remote(url):
        fs, _ = storage.get_fs(url, storage_options)
        con.register_filesystem(fs)
    return con


@dataclass
class KeptScan:
    """What planning needs from the decision table: per (dataset, shard) with a kept sample its
    kept count and fingerprint (count and the sum of the kept keys' md5 60-bit prefixes: it changes
    when the kept set does), and (dataset, key) pairs kept more than once in a dataset."""

    per_shard: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    duplicates: list[tuple[str, str]] = field(default_factory=list)


class _Partitions:
    """Append-only temp files of 64-bit hashes, split by their top bits."""

    def __init__(self, folder: str, rows: int) -> None:
        self.bits = min(int(math.log2(MAX_PARTS)), max(0, math.ceil(math.log2(max(1, rows) / PART_HASHES))))
        self.paths = [os.path.join(folder, f"h{i:03d}.u64") for i in range(1 << self.bits)]
        self.files = [open(p, "wb") for p in self.paths]

    def add(self, h: Any) -> None:
        import numpy as np

        if not self.bits:
            h.tofile(self.files[0])
            return
        part = h >> np.uint64(64 - self.bits)
        order = np.argsort(part, kind="stable")
        ends = np.cumsum(np.bincount(part, minlength=len(self.files)))
        hs = h[order]
        for i, end in enumerate(ends):
            start = ends[i - 1] if i else 0
            if end > start:
                hs[start:end].tofile(self.files[i])

    def close(self) -> None:
        for f in self.files:
            f.close()

    def repeated(self) -> Any:
        """Each partition's hashes seen more than once, partition by partition (after ``close``)."""
        import numpy as np

        for p in self.paths:
            a = np.fromfile(p, dtype=np.uint64)
            os.unlink(p)
            a.sort()
            twice = a[1:][a[1:] == a[:-1]]
            if twice.size:
                yield np.unique(twice)


def _u64(col: Any) -> Any:
    """A UBIGINT column of a streamed batch as a numpy view (through its buffer: pyarrow's own
    conversions import pandas, 45 MB of RSS for nothing here)."""
    import numpy as np

    if col.null_count:
        raise ValueError("the decision table has a kept row without a key")
    return np.frombuffer(col.buffers()[1], dtype=np.uint64, count=len(col), offset=col.offset * 8)


def _add_counts(sums: dict[tuple[str, str], list[int]], batch: Any) -> None:
    """Add a batch's kept counts and md5 prefix sums per (dataset, shard) to ``sums``. The table is
    sorted by (dataset, shard): a shard is a run of equal ``g`` (their hash), whose first and last
    rows name it; a run whose ends differ (two shards, one hash) is summed row by row."""
    import numpy as np

    g = _u64(batch.column("g"))
    prefix = _u64(batch.column("m")).byteswap() >> np.uint64(4)  # the first 15 hex digits of md5(key)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    hi = np.add.reduceat(prefix >> np.uint64(30), starts)  # 30-bit parts: a batch's sums fit in 64 bits
    lo = np.add.reduceat(prefix & np.uint64((1 << 30) - 1), starts)
    ds, sh = batch.column("dataset"), batch.column("shard")
    for a, e, h, low in zip(starts.tolist(), ends.tolist(), hi.tolist(), lo.tolist()):
        name = (ds[a].as_py(), sh[a].as_py())
        if name == (ds[e - 1].as_py(), sh[e - 1].as_py()):
            acc = sums.setdefault(name, [0, 0])
            acc[0] += e - a
            acc[1] += (h << 30) + low
            continue
        for d, s, p in zip(ds[a:e].to_pylist(), sh[a:e].to_pylist(), prefix[a:e].tolist()):
            acc = sums.setdefault((d, s), [0, 0])
            acc[0] += 1
            acc[1] += p


def _check(con: Any, src: str, hashes: Any, limit: int) -> list[tuple[str, str]]:
    """The (dataset, key) kept more than once among the rows whose hash is one of ``hashes``."""
    import pyarrow as pa

    con.register("_repeated", pa.table({"h": pa.array(hashes, pa.uint64())}))
    try:
        return [tuple(r) for r in con.execute(
            f"SELECT dataset, key FROM {src} WHERE dropped_by IS NULL AND hash(dataset, key) IN (SELECT h FROM _repeated) "
            f"GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2 LIMIT {int(limit)}").fetchall()]
    finally:
        con.unregister("_repeated")


def _duplicates(con: Any, src: str, parts: _Partitions, limit: int) -> list[tuple[str, str]]:
    dups: list[tuple[str, str]] = []
    for hashes in parts.repeated():
        for i in range(0, len(hashes), CHECK_CHUNK):
            dups.extend(_check(con, src, hashes[i:i + CHECK_CHUNK], limit - len(dups)))
            if len(dups) >= limit:
                return sorted(dups)
    return sorted(dups)


def scan_kept(decisions: str, storage_options: dict | None = None, limit: int = 5) -> KeptScan:
    """One streamed pass over the kept rows of ``decisions``: per-shard counts and fingerprints, and
    the hashes of (dataset, key) partitioned to temp files; then the duplicate check (at most
    ``limit`` duplicates). Memory: a batch, one partition, one entry per shard with a kept sample."""
    src = f"read_parquet({lit(decisions)})"
    sums: dict[tuple[str, str], list[int]] = {}
    with _con(decisions, storage_options) as con, tempfile.TemporaryDirectory(prefix="curate-plan-") as tmp:
        parts = _Partitions(tmp, con.execute(f"SELECT count(*) FROM {src}").fetchall()[0][0])  # from the footer
        try:
            reader = con.sql(f"SELECT dataset, shard, md5_number_upper(key) AS m, hash(dataset, key) AS h, "
                             f"hash(dataset, shard) AS g FROM {src} WHERE dropped_by IS NULL").to_arrow_reader(BATCH_ROWS)
            for batch in reader:
                _add_counts(sums, batch)
                parts.add(_u64(batch.column("h")))
        finally:
            parts.close()
        dups = _duplicates(con, src, parts, limit)
    return KeptScan({k: (n, f"{n}:{h}") for k, (n, h) in sums.items()}, dups)


def load_kept(decisions: str, dataset: str, shards: list[str], storage_options: dict | None = None) -> dict[str, list[str]]:
    """The kept keys of ``shards`` of ``dataset``, per shard."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    fs, path = storage.get_fs(decisions, storage_options)
    table = pds.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["shard", "key"],
        filter=(pc.field("dataset") == dataset) & pc.field("shard").isin(shards) & pc.field("dropped_by").is_null())
    out: dict[str, list[str]] = {s: [] for s in shards}
    for shard, key in zip(table.column("shard").to_pylist(), table.column("key").to_pylist()):
        out[shard].append(key)
    return out
