"""``meta``: shipped metadata from img2dataset's parquet (or each sample's .json) into the store,
matched by key, with no media read; presets for COYO, LAION and DataComp plus a user map."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.bench_filters import COYO_COLUMNS, make_coyo_shard
from curation import ScorerSpec, ScoreStore, ShardTask, score_local
from scorers import build_scorer


@pytest.fixture
def coyo(tmp_path):
    """A COYO-style shard of 40 URLs (some failed to download) with its parquet; one sample of the
    tar has lost its parquet row."""
    url = make_coyo_shard(str(tmp_path / "coyo"), "00000", 40, image_bytes=3000, failed=0.1, seed=1)
    pqt = url[:-4] + ".parquet"
    table = pq.read_table(pqt)
    ok = [i for i, s in enumerate(table.column("status").to_pylist()) if s == "success"]
    lost = table.column("key")[ok[5]].as_py()
    pq.write_table(table.filter(pa.array([k != lost for k in table.column("key").to_pylist()])), pqt)
    return url, table, lost, len(ok)


def _scores(work: str, scorer: str = "meta") -> dict[str, dict]:
    rows = ScoreStore(work).query_arrow(f"SELECT * FROM {scorer}").to_pylist()
    return {r["key"]: r for r in rows}


def test_coyo_parquet_lands_in_the_store_matched_by_key(coyo, tmp_path):
    url, table, lost, n_ok = coyo
    work = str(tmp_path / "work")
    report = score_local([ShardTask(url, "coyo", "pair")], ScorerSpec("meta", {"preset": "coyo"}), work)
    assert not report.failed
    got = _scores(work)
    assert len(got) == n_ok  # one row per sample of the tar, none for the URLs that failed
    truth = {r["key"]: r for r in table.to_pylist() if r["status"] == "success"}
    for key, row in got.items():
        if key == lost:
            assert row["error"] == f"no metadata row for key {lost!r} in {url[:-4]}.parquet"
            assert row["clip_b32"] is None
            continue
        assert row["error"] is None
        assert row["clip_b32"] == pytest.approx(truth[key]["clip_similarity_vitb32"], abs=1e-6)
        assert row["aesthetic"] == pytest.approx(truth[key]["aesthetic_score_laion_v2"], abs=1e-6)
        assert row["num_faces"] == truth[key]["num_faces"]


def test_json_source_gives_the_same_scores(coyo, tmp_path):
    url, _, lost, _ = coyo
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    score_local([ShardTask(url, "coyo", "pair")], ScorerSpec("meta", {"preset": "coyo", "source": "parquet"}), a)
    score_local([ShardTask(url, "coyo", "pair")], ScorerSpec("meta", {"preset": "coyo", "source": "json"}), b)
    pa_, pb = _scores(a), _scores(b)
    assert pa_.keys() == pb.keys()
    for k in pa_:
        if k != lost:  # the .json still has it: json source scores it
            assert {c: pa_[k][c] for c in ("clip_b32", "watermark", "nsfw_gantman")} == \
                   {c: pb[k][c] for c in ("clip_b32", "watermark", "nsfw_gantman")}
    assert pb[lost]["error"] is None and pa_[lost]["error"] is not None


def test_auto_source_falls_back_to_json_when_there_is_no_parquet(coyo, tmp_path):
    url, _, _, n_ok = coyo
    os.remove(url[:-4] + ".parquet")
    work = str(tmp_path / "work")
    score_local([ShardTask(url, "coyo", "pair")], ScorerSpec("meta", {"preset": "coyo"}), work)
    got = _scores(work)
    assert len(got) == n_ok and all(r["error"] is None and r["clip_l14"] is not None for r in got.values())
    report = score_local([ShardTask(url, "coyo", "pair")], ScorerSpec("meta", {"preset": "coyo", "source": "parquet"}),
                         str(tmp_path / "w2"))
    assert "no metadata parquet beside" in report.failed[0].failed


def test_user_map_and_presets(coyo, tmp_path):
    url, _, _, _ = coyo
    work = str(tmp_path / "work")
    spec = ScorerSpec("meta", {"columns": {"caption": {"as": "alt_text", "type": "string"},
                                           "watermark_score": "wm"}})
    assert not score_local([ShardTask(url, "coyo", "pair")], spec, work).failed
    row = next(iter(_scores(work).values()))
    assert isinstance(row["alt_text"], str) and isinstance(row["wm"], float)
    # a preset whose required columns are not in the file fails the shard, naming them
    report = score_local([ShardTask(url, "coyo", "pair")], ScorerSpec("meta", {"preset": "datacomp"}),
                         str(tmp_path / "dc"))
    assert "clip_b32_similarity_score" in report.failed[0].failed
    # LAION's optional columns may be absent: they come out null
    laion = build_scorer("meta", preset="laion", columns={"clip_similarity_vitb32": {"as": "similarity_b32"}})
    assert "language" in laion.schema().names and "similarity_b32" in laion.schema().names


def test_bad_maps_are_refused_and_maps_change_the_config_hash():
    with pytest.raises(ValueError, match="unknown preset 'coyo700m'"):
        build_scorer("meta", preset="coyo700m")
    with pytest.raises(ValueError, match="name a preset"):
        build_scorer("meta")
    with pytest.raises(ValueError, match="type 'float16' is not one of"):
        build_scorer("meta", columns={"x": {"as": "x", "type": "float16"}})
    with pytest.raises(ValueError, match="same store column"):
        build_scorer("meta", preset="coyo", columns={"other": "clip_b32"})
    a = build_scorer("meta", preset="coyo").config_hash()
    assert a != build_scorer("meta", preset="coyo", columns={"x": "y"}).config_hash()
    assert a == build_scorer("meta", preset="coyo").config_hash()
    assert build_scorer("meta", preset="coyo").needs_media is False
    assert set(COYO_COLUMNS) <= set(json.loads(json.dumps(build_scorer("meta", preset="coyo").config()))["columns"])


class _CountingReader:
    """A remote shard's file object that counts the reads made on it."""

    def __init__(self, f, reads: list) -> None:
        self._f, self._reads = f, reads

    def read(self, n: int = -1) -> bytes:
        self._reads.append(n)
        return self._f.read(n)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_meta_on_s3_matches_local_in_a_few_large_reads(coyo, s3_bucket, tmp_path, monkeypatch):
    """A shard in an object store is read in large windows (here 64 KiB, to have several), not a
    request per member, and scores exactly as the same shard on local disk."""
    from curation.data import storage, tarindex

    url, _, _, n_ok = coyo
    remote = f"{s3_bucket}/coyo/00000.tar"
    for suffix in (".tar", ".parquet"):
        with open(url[:-4] + suffix, "rb") as f:
            storage.write_bytes(remote[:-4] + suffix, f.read())
    reads: list = []
    real_open = storage.open_url
    monkeypatch.setattr(storage, "open_url", lambda u, *a, **k: _CountingReader(real_open(u, *a, **k), reads)
                        if u == remote else real_open(u, *a, **k))
    monkeypatch.setattr(tarindex, "WINDOW", 64 << 10)
    spec = ScorerSpec("meta", {"preset": "coyo"})
    assert not score_local([ShardTask(remote, "coyo", "pair")], spec, str(tmp_path / "s3")).failed
    assert not score_local([ShardTask(url, "coyo", "pair")], spec, str(tmp_path / "local")).failed
    got, want = _scores(str(tmp_path / "s3")), _scores(str(tmp_path / "local"))
    assert len(got) == n_ok and got.keys() == want.keys()
    for k in got:  # the same scores, and the same samples without a row (the message names the parquet's URL)
        assert {c: v for c, v in got[k].items() if c != "error"} == {c: v for c, v in want[k].items() if c != "error"}
        assert (got[k]["error"] is None) == (want[k]["error"] is None)
    size = os.path.getsize(url)
    assert 2 <= len([n for n in reads if n >= 4096]) and len(reads) <= size // (64 << 10) + 4, (len(reads), size)
