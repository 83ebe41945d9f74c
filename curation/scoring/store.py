"""The score store: DuckDB views over every score file, local or on S3.

One view per scorer (``basic``, ``clip``, ...) over ``<work>/scores/<scorer>/dataset=*/*.parquet``
and a joined view ``scores`` keyed by ``(dataset, shard, key)``: identity columns once,
then every scorer's columns; a column name that two scorers share is prefixed with the
scorer's name, and each scorer's ``error`` becomes ``<scorer>_error``.

On S3 DuckDB's httpfs extension is not needed: the store registers an fsspec ``s3fs``
filesystem on the connection (honouring ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import re
from typing import Any

import duckdb

from curation.data import storage

IDENTITY = ("dataset", "shard", "key")
VIEW_IDENTITY = (*IDENTITY, "kind")  # the ``scores`` view's columns that are not scores
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ScoreStore:
    def __init__(self, work: str, storage_options: dict[str, Any] | None = None,
                 con: duckdb.DuckDBPyConnection | None = None) -> None:
        self.work = work
        self.root = storage.join(work, "scores")
        self.storage_options = storage_options
        self.con = con or duckdb.connect()
        if storage.is_remote(work):
            fs, _ = storage.get_fs(work, storage_options)
            self.con.register_filesystem(fs)
        self.views: dict[str, list[str]] = {}
        self._catalogs: dict[str, Any] = {}
        self.refresh()

    def scorers(self) -> list[str]:
        found = []
        for d in storage.list_dirs(self.root, self.storage_options):
            name = storage.basename(d)
            if _NAME_RE.match(name) and any(storage.list_files(x, ".parquet", self.storage_options)
                                            for x in storage.list_dirs(d, self.storage_options)):
                found.append(name)
        return found

    def files_glob(self, scorer: str) -> str:
        return storage.join(self.root, scorer, "dataset=*", "*.parquet")

    def refresh(self) -> None:
        """(Re)create the views from the files present now."""
        self.views = {}
        self._catalogs = {}
        for name in self.scorers():
            glob = self.files_glob(name).replace("'", "''")
            # files of one schema (the catalog says): DuckDB need not open every footer to unite them
            one = len(set(self.catalog(name).column("schema_hash").to_pylist())) == 1
            self.con.execute(
                f"CREATE OR REPLACE VIEW {_quote(name)} AS SELECT * FROM read_parquet('{glob}', "
                f"hive_partitioning = false, union_by_name = {'false' if one else 'true'})"
            ).fetchall()
            cols = [r[0] for r in self.con.execute(f"DESCRIBE {_quote(name)}").fetchall()]
            self.views[name] = cols
        self._create_joined()

    def _create_joined(self) -> None:
        if not self.views:
            self.con.execute("CREATE OR REPLACE VIEW scores AS SELECT NULL::VARCHAR AS dataset, NULL::VARCHAR AS shard, "
                             "NULL::VARCHAR AS key, NULL::VARCHAR AS kind WHERE false").fetchall()
            return
        names = list(self.views)
        first = names[0]
        select = [f"COALESCE({', '.join(f'{_quote(n)}.{c}' for n in names)}) AS {c}" for c in IDENTITY]
        select.append(f"COALESCE({', '.join(f'{_quote(n)}.kind' for n in names)}) AS kind")
        select += [f"{_quote(n)}.{_quote(c)} AS {_quote(alias)}" for alias, n, c in self.column_sources()]
        # explicit ON conditions (not USING) so that qualified identity columns stay addressable;
        # COALESCE gives each identity column its value whichever table has the row
        join = _quote(first)
        for i, n in enumerate(names[1:], 1):
            on = " AND ".join(
                f"{_quote(n)}.{c} = COALESCE({', '.join(f'{_quote(m)}.{c}' for m in names[:i])})" for c in IDENTITY
            )
            join += f" FULL OUTER JOIN {_quote(n)} ON {on}"
        sql = f"CREATE OR REPLACE VIEW scores AS SELECT {', '.join(select)} FROM {join}"
        self.con.execute(sql).fetchall()

    # ---- querying
    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        return self.con.sql(query)

    def query_pl(self, query: str):
        return self.con.sql(query).pl()

    def query_arrow(self, query: str):
        return self.con.sql(query).to_arrow_table()

    def count(self, scorer: str) -> int:
        return int(self.con.execute(f"SELECT count(*) FROM {_quote(scorer)}").fetchall()[0][0])

    def columns(self, view: str = "scores") -> list[str]:
        return [r[0] for r in self.con.execute(f"DESCRIBE {_quote(view)}").fetchall()]

    # ---- the catalog (curation.scoring.catalog): one file per scorer, not one footer per score file
    def catalog(self, scorer: str) -> Any:
        """The scorer's catalog (a pyarrow Table, one row per score file), refreshed first."""
        from curation.scoring import catalog

        if scorer not in self._catalogs:
            self._catalogs[scorer] = catalog.refresh(storage.join(self.root, scorer), self.storage_options)
        return self._catalogs[scorer]

    def datasets(self) -> list[str]:
        return sorted({d for s in self.views for d in self.catalog(s).column("dataset").to_pylist()})

    def rows(self) -> int:
        """Rows of the scorer with the most (the size of the joined table when every scorer is complete)."""
        return max([sum(self.catalog(s).column("rows").to_pylist()) for s in self.views] or [0])

    def shards(self, scorer: str) -> set[tuple[str, str]]:
        """(dataset, shard) of every score file the scorer has."""
        t = self.catalog(scorer)
        return set(zip(t.column("dataset").to_pylist(), t.column("shard").to_pylist()))

    def column_sources(self) -> list[tuple[str, str, str]]:
        """(name in the ``scores`` view, scorer, column in its files) of every score column, in the
        view's order: a column that two scorers share, and each scorer's ``error``, are prefixed
        with the scorer's name; the identity columns and ``kind`` are not score columns."""
        counts: dict[str, int] = {}
        for cols in self.views.values():
            for c in cols:
                counts[c] = counts.get(c, 0) + 1
        return [(f"{n}_{c}" if (c == "error" or counts[c] > 1) else c, n, c)
                for n, cols in self.views.items() for c in cols if c not in VIEW_IDENTITY]

    def column_owners(self) -> dict[str, str]:
        """Each column of the ``scores`` view (as named there) -> the scorer that wrote it."""
        return {alias: n for alias, n, _ in self.column_sources()}

    def fingerprint(self) -> str:
        """A key of the score files present now, from the catalogs: each scorer's files with their
        rows, size and version (mtime locally, ETag on S3). Selection records it in its decision
        file, so a later reader can tell decisions made from these very files."""
        import hashlib
        import json

        h = hashlib.sha256()
        for s in sorted(self.views):
            t = self.catalog(s)
            rows = sorted(zip(*[t.column(c).to_pylist() for c in ("path", "rows", "file_size", "file_version")]))
            h.update(json.dumps([s, rows], default=str).encode())
        return h.hexdigest()[:16]

    # ---- provenance
    def file_metadata(self) -> list[dict[str, str]]:
        """The ``curation.*`` metadata of every score file (one dict per file, with ``file``), from the catalogs."""
        prefix = "curation."
        out = []
        for scorer in self.views:
            folder = storage.join(self.root, scorer)
            for r in self.catalog(scorer).to_pylist():
                md = {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix) and v is not None}
                if md:
                    out.append({**md, "file": storage.join(folder, r["path"])})
        return out

    def _same_bytes(self, prev: dict[str, Any], md: dict[str, str]) -> bool:
        """Two checksums of one local shard made with different hashes (an md5 or a sha256 from an
        earlier version, an xxh128 now): true when the file today matches both. ``prev`` keeps the
        one cheapest to verify (``records.BY_COST``): resharding hashes every byte with it."""
        from curation.data.records import BY_COST
        from curation.data.shards import checksum_algo, file_checksum

        a, b = prev["checksum"], md["shard_checksum"]
        if checksum_algo(a) == checksum_algo(b) or storage.is_remote(prev["url"]):
            return False
        try:
            ok = all(file_checksum(prev["url"], self.storage_options, checksum_algo(c))[1] == c for c in (a, b))
        except FileNotFoundError:
            return False
        cheapest = BY_COST.index
        if ok and cheapest(checksum_algo(b)) < cheapest(checksum_algo(a)):
            prev["checksum"] = b
        return ok

    def inputs(self) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Input shards as the score files recorded them, and each scorer's identities.

        Returns ``({(dataset, shard): {url, checksum, rows}}, {scorer: [{config_hash, identity}, ...]})``.
        Two scorers that saw different bytes for the same shard make the store inconsistent:
        that raises, naming the shard.
        """
        import json

        from curation.data.shards import shard_name

        shards: dict[tuple[str, str], dict[str, Any]] = {}
        scorers: dict[str, dict[str, dict[str, Any]]] = {}
        for md in self.file_metadata():
            key = (md["dataset"], shard_name(md["shard_url"]))
            prev = shards.get(key)
            if prev is not None and prev["url"] != md["shard_url"]:
                raise ValueError(f"score files of {key[0]}/{key[1]} come from two sources, {prev['url']} and "
                                 f"{md['shard_url']}; score them under different dataset names")
            if prev is not None and prev["checksum"] != md["shard_checksum"] and not self._same_bytes(prev, md):
                raise ValueError(
                    f"shard {md['shard_url']} was scored in two versions (checksums {prev['checksum']} and "
                    f"{md['shard_checksum']}); rescore it with every scorer")
            if prev is None:
                shards[key] = {"url": md["shard_url"], "checksum": md["shard_checksum"], "rows": int(md["rows"])}
            scorers.setdefault(md["scorer"], {})[md["config_hash"]] = {
                "config_hash": md["config_hash"], "identity": json.loads(md["identity"])}
        return shards, {k: list(v.values()) for k, v in scorers.items()}
