"""``meta``: the scores a pool already ships, imported into the store instead of computed again.

COYO-700M ships CLIP similarities, watermark, aesthetic and NSFW scores; LAION ships CLIP
similarity, watermark and unsafe probabilities and a language; DataComp ships CLIP B/32 and L/14
scores and a uid. img2dataset writes them into the ``<shard>.parquet`` beside each ``<shard>.tar``
(one row per URL it tried, keyed by ``key``) and into each sample's ``.json``.

The scorer reads the columns a recipe names from one of them (``source``: ``parquet``, ``json``,
or ``auto``: the parquet when there is one, else the ``.json``), renamed and typed by a column
map: a built-in one (``preset: coyo | laion | datacomp``) and/or the user's (``columns``)::

    - name: meta
      params:
        preset: coyo
        columns: {my_score: {as: my_score, type: float32}, source_lang: lang}

Each sample's row is found by its key; a sample with no row gets ``error`` set. It decodes no
media (``needs_media = False``: the engine reads only the shard's headers and text members).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Sequence

import pyarrow as pa

from scorers.base import Prepared, Scorer

TYPES = {"float32": pa.float32(), "float64": pa.float64(), "int32": pa.int32(), "int64": pa.int64(),
         "string": pa.string(), "bool": pa.bool_()}

# source column -> (store column, type, required). Column names as each pool's metadata spells them.
PRESETS: dict[str, dict[str, tuple[str, str, bool]]] = {
    "coyo": {  # kakaobrain/coyo-700m
        "clip_similarity_vitb32": ("clip_b32", "float32", True),
        "clip_similarity_vitl14": ("clip_l14", "float32", True),
        "watermark_score": ("watermark", "float32", True),
        "aesthetic_score_laion_v2": ("aesthetic", "float32", True),
        "nsfw_score_opennsfw2": ("nsfw_opennsfw2", "float32", True),
        "nsfw_score_gantman": ("nsfw_gantman", "float32", True),
        "num_faces": ("num_faces", "int32", False),
    },
    "laion": {  # LAION-400M / LAION-5B (laion2B-en, -multi, -nolang); laion-aesthetics adds `aesthetic`
        "similarity": ("clip_b32", "float32", True),
        "pwatermark": ("watermark", "float32", False),
        "punsafe": ("nsfw", "float32", False),
        "LANGUAGE": ("language", "string", False),
        "aesthetic": ("aesthetic", "float32", False),
    },
    "datacomp": {  # DataComp CommonPool
        "clip_b32_similarity_score": ("clip_b32", "float32", True),
        "clip_l14_similarity_score": ("clip_l14", "float32", True),
        "uid": ("uid", "string", True),
    },
}


def _column_map(preset: str | None, columns: dict[str, Any] | None) -> dict[str, tuple[str, str, bool]]:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"meta: unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    out = dict(PRESETS[preset]) if preset else {}
    for src, spec in (columns or {}).items():
        if isinstance(spec, str):
            spec = {"as": spec}
        if not isinstance(spec, dict) or not set(spec) <= {"as", "type", "required"}:
            raise ValueError(f"meta: columns.{src} must be a store column name or {{as, type, required}}, got {spec!r}")
        typ = spec.get("type", "float64")
        if typ not in TYPES:
            raise ValueError(f"meta: columns.{src}.type {typ!r} is not one of {', '.join(TYPES)}")
        out[src] = (str(spec.get("as", src)), typ, bool(spec.get("required", True)))
    if not out:
        raise ValueError("meta: name a preset (coyo, laion, datacomp) or columns to import")
    stores = [v[0] for v in out.values()]
    dup = sorted({s for s in stores if stores.count(s) > 1})
    if dup:
        raise ValueError(f"meta: two source columns map to the same store column(s) {dup}")
    return out


class MetaScorer(Scorer):
    name = "meta"
    version = "1"
    needs_media: ClassVar[bool] = False  # the engine hands it keys and text members only

    def __init__(self, preset: str | None = None, columns: dict[str, Any] | None = None, source: str = "auto",
                 key_column: str = "key") -> None:
        if source not in ("auto", "parquet", "json"):
            raise ValueError(f"meta: source must be auto, parquet or json, got {source!r}")
        self.preset, self.source, self.key_column = preset, source, key_column
        self.columns = _column_map(preset, columns)
        self._shard: tuple[str, Any] | None = None  # (shard url, its metadata lookup): one shard at a time

    def config(self) -> dict[str, Any]:
        return {"source": self.source, "key_column": self.key_column,
                "columns": {src: list(v) for src, v in sorted(self.columns.items())}}

    def schema(self) -> pa.Schema:
        return pa.schema([(store, TYPES[typ]) for store, typ, _ in self.columns.values()])

    # ---- per shard: the metadata table and its key index ------------------------------
    def _lookup(self, url: str) -> "ParquetLookup | None":
        if self._shard is None or self._shard[0] != url:
            self._shard = (url, ParquetLookup.open(url, self) if self.source != "json" else None)
        return self._shard[1]

    def compute(self, prepared: Prepared) -> dict[str, list]:
        samples = prepared.samples
        url = samples[0].url if samples else None
        lookup = self._lookup(url) if url else None
        if lookup is not None:
            return lookup.columns_for(samples, prepared.errors)
        if self.source == "parquet":
            raise FileNotFoundError(f"meta: no metadata parquet beside {url} (source: parquet)")
        return self._from_json(samples, prepared.errors)

    def _from_json(self, samples: Sequence[Any], errors: list[str | None]) -> dict[str, list]:
        cols: dict[str, list] = {store: [] for store, _, _ in self.columns.values()}
        for i, s in enumerate(samples):
            doc, why = _json_of(s)
            missing = [src for src, (_, _, req) in self.columns.items() if req and doc is not None and src not in doc]
            if doc is None or missing:
                why = why or f"no {', '.join(missing)} in {s.key}.json"
                errors[i] = f"{errors[i]}; {why}" if errors[i] else why
                doc = {}
            for src, (store, _, _) in self.columns.items():
                cols[store].append(doc.get(src))
        out = {}
        for src, (store, typ, _) in self.columns.items():
            try:
                out[store] = pa.array(cols[store], type=TYPES[typ])
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
                raise ValueError(f"meta: column {src!r} of the .json members cannot be read as {typ}: {e}") from None
        return out


def _json_of(s: Any) -> tuple[dict[str, Any] | None, str | None]:
    raw = s.members.get("json")
    if raw is None:
        return None, f"no metadata for key {s.key!r}: the sample has no .json member"
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"invalid JSON in {s.key}.json: {e}"
    return (doc, None) if isinstance(doc, dict) else (None, f"{s.key}.json is not a JSON object")


class ParquetLookup:
    """One shard's metadata parquet: the wanted columns, typed once, and each key's row."""

    def __init__(self, url: str, table: pa.Table, scorer: MetaScorer) -> None:
        import pyarrow.compute as pc

        self.url, self.scorer = url, scorer
        keys = table.column(scorer.key_column).cast(pa.string())
        rows = pa.array(range(table.num_rows), pa.int64())
        if "status" in table.column_names:  # img2dataset's rows for URLs it failed to download: no sample has them
            ok = pc.fill_null(pc.equal(table.column("status"), "success"), False)
            keys, rows = keys.filter(ok), rows.filter(ok)
        key_list = keys.to_pylist()
        self.index: dict[str, int] = dict(zip(key_list, rows.to_pylist()))
        self.ambiguous: set[str] = set()
        if len(self.index) < len(key_list):
            seen: set[str] = set()
            self.ambiguous = {k for k in key_list if k in seen or seen.add(k)}
        self.columns: dict[str, pa.Array] = {}  # store column -> the whole column, cast once
        for src, (store, typ, _) in scorer.columns.items():
            if src in table.column_names:
                try:
                    self.columns[store] = table.column(src).cast(TYPES[typ]).combine_chunks()
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise ValueError(f"meta: column {src!r} of {url} cannot be read as {typ}: {e}") from None

    @classmethod
    def open(cls, shard_url: str, scorer: MetaScorer) -> "ParquetLookup | None":
        """The lookup of the parquet beside ``shard_url``; None when there is none."""
        import pyarrow.parquet as pq

        from curation.data import storage
        from curation.data.records import shard_name

        url = storage.join(storage.dirname(shard_url), f"{shard_name(shard_url)}.parquet")
        if not storage.exists(url):
            return None
        with storage.open_url(url, "rb") as f:
            pf = pq.ParquetFile(f)
            present = set(pf.schema_arrow.names)
            wanted = [c for c in (scorer.key_column, "status", *scorer.columns) if c in present]
            missing = [c for c, (_, _, req) in scorer.columns.items() if req and c not in present]
            if scorer.key_column not in present or missing:
                raise ValueError(f"meta: {url} has no column(s) {[scorer.key_column] if scorer.key_column not in present else []}"
                                 f"{missing if missing else ''}; it has {sorted(present)}")
            table = pf.read(columns=list(dict.fromkeys(wanted)))
        return cls(url, table, scorer)

    def columns_for(self, samples: Sequence[Any], errors: list[str | None]) -> dict[str, Any]:
        rows = list(map(self.index.get, [s.key for s in samples]))
        if self.ambiguous or None in rows:
            for i, s in enumerate(samples):
                why = None
                if rows[i] is None:
                    why = f"no metadata row for key {s.key!r} in {self.url}"
                elif s.key in self.ambiguous:
                    why, rows[i] = f"key {s.key!r} has more than one row in {self.url}", None
                if why:
                    errors[i] = f"{errors[i]}; {why}" if errors[i] else why
        take = pa.array(rows, type=pa.int64())
        return {store: self.columns[store].take(take) if store in self.columns else pa.nulls(len(samples), TYPES[typ])
                for store, typ, _ in self.scorer.columns.values()}
