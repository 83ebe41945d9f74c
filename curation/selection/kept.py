"""Kept keys read from the decision table as they are needed, never all at once.

Planning a reshard needs, per input shard, how many samples are kept and a fingerprint of which
(:func:`kept_per_shard`: one DuckDB aggregate, one row per shard); writing a group needs the
kept keys of its few shards (:func:`load_kept`: a filtered read that skips the row groups of
other shards, the table being sorted by dataset, shard, key). Checks over every kept key
(:func:`duplicate_kept`) run in DuckDB under its memory limit.
"""

from __future__ import annotations

from typing import Any

from curation.data import storage
from curation.selection.sqlsafe import literal as lit


PLAN_MEMORY = "48MB"  # planning holds one row per shard; the duplicate-key check spills past this


def _con(url: str, storage_options: dict | None) -> Any:
    import duckdb

    con = duckdb.connect(config={"memory_limit": PLAN_MEMORY, "threads": 1, "preserve_insertion_order": False})
    con.execute("SET enable_progress_bar = false")
    if storage.is_remote(url):
        fs, _ = storage.get_fs(url, storage_options)
        con.register_filesystem(fs)
    return con


def kept_per_shard(decisions: str, storage_options: dict | None = None) -> dict[tuple[str, str], tuple[int, str]]:
    """``{(dataset, shard): (kept, fingerprint)}`` for every shard with a decision; the fingerprint
    (count and a sum of the kept keys' md5 prefixes) changes when the kept set does."""
    with _con(decisions, storage_options) as con:
        rows = con.execute(
            f"SELECT dataset, shard, count(*) FILTER (WHERE dropped_by IS NULL), "
            f"coalesce(sum(('0x' || md5(key)[1:15])::UBIGINT::HUGEINT) FILTER (WHERE dropped_by IS NULL), 0)::VARCHAR "
            f"FROM read_parquet({lit(decisions)}) GROUP BY 1, 2").fetchall()
    return {(ds, sh): (int(n), f"{n}:{h}") for ds, sh, n, h in rows}


def duplicate_kept(decisions: str, storage_options: dict | None = None, limit: int = 5) -> list[tuple[str, str]]:
    """(dataset, key) kept in more than one shard of a dataset (at most ``limit``)."""
    with _con(decisions, storage_options) as con:
        return [tuple(r) for r in con.execute(
            f"SELECT dataset, key FROM read_parquet({lit(decisions)}) WHERE dropped_by IS NULL GROUP BY 1, 2 "
            f"HAVING count(*) > 1 ORDER BY 1, 2 LIMIT {int(limit)}").fetchall()]


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
