"""The store catalog: one small Parquet file per scorer indexing its score files.

``<work>/scores/<scorer>/_catalog.parquet`` holds one row per score file of that scorer:
``path`` (relative to the scorer's folder, ``dataset=coyo/00000.parquet``), ``dataset``,
``shard``, ``rows`` (int64), every key of the file's Parquet key-value metadata as a string
column of the same name (``curation.shard_url``, ``curation.shard_checksum``,
``curation.config_hash``...; ``ARROW:schema``, pyarrow's serialized schema, is left out), and
``file_size`` / ``file_version`` (mtime locally, ETag on S3), which tell a file that changed
since it was indexed, and ``schema_hash`` (of its column names and types: when every file of a
scorer has the same, the store's views need not read every footer to unite their schemas).

Planning reads one catalog per scorer instead of one footer per score file (on S3 that is one
request per file: 70k shards x 3 scorers). The score files stay the truth: :func:`refresh`
lists the folder (a LIST per dataset, no file read), reads the footers of files that are new or
changed since the catalog was written, forgets files that are gone, and rewrites the catalog
atomically (temp + rename locally, one PUT on S3) only when something changed. A store written
before catalogs existed gets one on its first refresh.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.data import storage

CATALOG = "_catalog.parquet"
FIXED = ("path", "dataset", "shard", "rows", "file_size", "file_version", "schema_hash")
SKIPPED_KEYS = {"ARROW:schema"}


def catalog_url(scorer_dir: str) -> str:
    return storage.join(scorer_dir, CATALOG)


def _version(entry: dict[str, Any]) -> str:
    v = entry.get("ETag") or entry.get("mtime") or entry.get("LastModified") or entry.get("created") or ""
    return str(v).strip('"')


def list_score_files(scorer_dir: str, storage_options: dict | None = None) -> dict[str, tuple[int, str]]:
    """``{path relative to scorer_dir: (size, version)}`` of every score file, from listings only."""
    fs, root = storage.get_fs(scorer_dir, storage_options)
    out: dict[str, tuple[int, str]] = {}
    if not fs.exists(root):
        return out
    fs.invalidate_cache(root)
    for d in fs.ls(root, detail=True):
        name = os.path.basename(d["name"].rstrip("/"))
        if d.get("type") != "directory" or not name.startswith("dataset="):
            continue
        for e in fs.ls(d["name"], detail=True):
            fname = os.path.basename(e["name"])
            if e.get("type") == "file" and fname.endswith(".parquet") and not fname.startswith("."):
                out[f"{name}/{fname}"] = (int(e.get("size") or 0), _version(e))
    return out


def _footer(scorer_dir: str, rel: str, storage_options: dict | None) -> dict[str, Any] | None:
    fs, path = storage.get_fs(storage.join(scorer_dir, rel), storage_options)
    try:
        with fs.open(path, "rb") as f:
            md = pq.read_metadata(f)
    except Exception:  # noqa: BLE001 - an unreadable (half-written, foreign) file is not indexed
        return None
    kv = {k.decode(): v.decode("utf-8", "replace") for k, v in (md.metadata or {}).items()
          if k.decode() not in SKIPPED_KEYS}
    ds = rel.split("/", 1)[0][len("dataset="):]
    schema = ";".join(f"{f.name}:{f.type}" for f in md.schema.to_arrow_schema())
    return {**kv, "path": rel, "dataset": ds, "shard": os.path.basename(rel)[: -len(".parquet")],
            "rows": md.num_rows, "schema_hash": hashlib.sha256(schema.encode()).hexdigest()[:16]}


def read(scorer_dir: str, storage_options: dict | None = None) -> pa.Table | None:
    """The catalog as written (None when there is none or it cannot be read)."""
    url = catalog_url(scorer_dir)
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options)))
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    keys = sorted({k for r in rows for k in r} - set(FIXED))
    cols: dict[str, pa.Array] = {
        "path": pa.array([r["path"] for r in rows], pa.string()),
        "dataset": pa.array([r["dataset"] for r in rows], pa.string()),
        "shard": pa.array([r["shard"] for r in rows], pa.string()),
        "rows": pa.array([int(r["rows"]) for r in rows], pa.int64()),
        "file_size": pa.array([int(r["file_size"]) for r in rows], pa.int64()),
        "file_version": pa.array([str(r["file_version"]) for r in rows], pa.string()),
        "schema_hash": pa.array([r.get("schema_hash") for r in rows], pa.string()),
    }
    for k in keys:
        cols[k] = pa.array([None if r.get(k) is None else str(r[k]) for r in rows], pa.string())
    return pa.table(cols)


def refresh(scorer_dir: str, storage_options: dict | None = None, write: bool = True) -> pa.Table:
    """The catalog brought up to date with the files present now (see the module docstring);
    written back when it changed and ``write`` (a read-only store is still read)."""
    files = list_score_files(scorer_dir, storage_options)
    old = read(scorer_dir, storage_options)
    known: dict[str, dict[str, Any]] = {}
    if old is not None and "schema_hash" in old.column_names:
        for r in old.to_pylist():
            if files.get(r["path"]) == (r["file_size"], r["file_version"]):
                known[r["path"]] = r
    todo = sorted(set(files) - set(known))
    threads = 16 if storage.is_remote(scorer_dir) else 4
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for rel, row in zip(todo, pool.map(lambda p: _footer(scorer_dir, p, storage_options), todo)):
            if row is not None:
                known[rel] = {**row, "file_size": files[rel][0], "file_version": files[rel][1]}
    rows = [known[p] for p in sorted(known)]
    table = _table(rows)
    def state(t: pa.Table) -> set:
        return set(zip(*(t.column(c).to_pylist() for c in ("path", "file_size", "file_version"))))

    changed = old is None or set(old.column_names) != set(table.column_names) or state(old) != state(table)
    if write and changed:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        try:
            storage.write_bytes(catalog_url(scorer_dir), buf.getvalue(), storage_options)
        except (PermissionError, OSError):
            pass  # a store we may not write: the catalog is an index, rebuilt next time
    return table
