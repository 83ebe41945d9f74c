"""S3 faults between our clients and a real S3 endpoint (moto's server), injected by
``curation.common.faultproxy``: 503 SlowDown, 500 InternalError, reset connections, cut bodies,
delays. The retries are botocore's and s3fs's (configured in ``curation.data.storage``); these
tests check what a user relies on: outputs byte-identical to a fault-free run, every sample once,
and under a store that keeps failing, an error naming the object and nothing half-written."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from curation.common.faultproxy import KINDS, FaultProxy
from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from curation.data import storage
from curation.data.shards import dataset_of, list_shards, read_shard
from curation.scoring.engine import ScorerSpec, ShardTask, score_local
from curation.selection.curate import curate
from curation.selection.reshard import ReshardConfig

pytestmark = pytest.mark.s3

POLICY = {"defaults": [{"rule": "valid", "min_size": 8}], "datasets": {"coyo_synth": [{"rule": "dedup", "column": "sha256"}]},
          "stages": {"align": {"coyo_synth": 1.0}}}


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


@pytest.fixture(scope="module")
def corpus(s3_endpoint):
    """Two small shards on S3 (duplicates and a corrupt image among them), scored and curated
    once without faults: the reference every faulty run must reproduce byte for byte."""
    import uuid

    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    _fs(s3_endpoint).mkdir(bucket)
    root = f"s3://{bucket}"
    synthesize(f"{root}/corpus", SynthConfig(seed=3, datasets=[
        DatasetSpec("coyo_synth", "pair", 16, {"exact_duplicate": 0.2, "corrupt_image": 0.1}, 8)]))
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(f"{root}/corpus/coyo_synth")]
    assert not score_local(tasks, ScorerSpec("basic"), f"{root}/clean/work").failed
    manifest, _ = curate(f"{root}/clean/work", POLICY, f"{root}/clean/out", ReshardConfig(max_samples=5), use_ray=False)
    return {"root": root, "tasks": tasks, "manifest": manifest}


def _scores(work: str):
    import pyarrow.parquet as pq

    out = {}
    for url in storage.list_files(f"{work}/scores/basic/dataset=coyo_synth", ".parquet"):
        with storage.open_url(url) as f:
            out[storage.basename(url)] = pq.read_table(f)
    return out


def _retries(fs) -> dict:
    """The retry settings an s3fs filesystem hands botocore. botocore rewrites ``max_attempts`` in
    place into ``total_max_attempts`` (one more: the first try counts) once a client was made from
    it, and fsspec caches filesystems, so an earlier test's client may have done so already."""
    r = dict(fs.config_kwargs["retries"])
    if "total_max_attempts" in r:
        r["max_attempts"] = r.pop("total_max_attempts") - 1
    return r


def test_retry_settings_are_set_in_one_place_and_overridable(monkeypatch):
    for k in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "CURATION_S3FS_RETRIES"):
        monkeypatch.delenv(k, raising=False)
    fs, _ = storage.get_fs("s3://some-bucket/x")
    assert _retries(fs) == {"mode": "standard", "max_attempts": 5} and fs.retries == 5
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("CURATION_S3FS_RETRIES", "2")
    fs, _ = storage.get_fs("s3://some-bucket/x")
    assert _retries(fs) == {"mode": "adaptive", "max_attempts": 3} and fs.retries == 2
    fs, _ = storage.get_fs("s3://some-bucket/x", {"config_kwargs": {"retries": {"mode": "legacy", "max_attempts": 7}},
                                                 "retries": 9})
    assert _retries(fs) == {"mode": "legacy", "max_attempts": 7} and fs.retries == 9


def test_proxy_answers_with_s3_errors_and_clients_retry_through_every_kind(s3_endpoint, s3_bucket, monkeypatch):
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("slowdown",)) as p:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{p.url}/{s3_bucket[5:]}/missing", timeout=5)
        assert e.value.code == 503 and b"<Code>SlowDown</Code>" in e.value.read()
        p.kinds = ("internal",)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{p.url}/{s3_bucket[5:]}/missing", timeout=5)
        assert e.value.code == 500 and b"<Code>InternalError</Code>" in e.value.read()
        assert [(f.kind, f.method) for f in p.injected] == [("slowdown", "GET"), ("internal", "GET")]

    blobs = {f"{s3_bucket}/obj{i}": bytes([i]) * (40_000 + i) for i in range(8)}
    with FaultProxy(s3_endpoint, rate=0.3, seed=4, delay_s=0.02) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        for url, data in blobs.items():
            storage.write_bytes(url, data)
        back = {url: storage.read_bytes(url) for url in blobs}
    assert back == blobs
    assert set(p.counts()) == set(KINDS), p.counts()  # seeded: this run meets every kind
    assert p.requests == len(p.history) > len(p.injected) > 0


def test_score_and_reshard_under_faults_equal_a_clean_run(corpus, s3_endpoint, monkeypatch):
    root, tasks, clean = corpus["root"], corpus["tasks"], corpus["manifest"]
    with FaultProxy(s3_endpoint, rate=0.15, seed=1, delay_s=0.02) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        report = score_local(tasks, ScorerSpec("basic"), f"{root}/faulty/work")
        manifest, _ = curate(f"{root}/faulty/work", POLICY, f"{root}/faulty/out", ReshardConfig(max_samples=5),
                             use_ray=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert len(p.injected) >= 5, p.counts()
    assert not report.failed and report.summary()["rows"] == 16
    a, b = _scores(f"{root}/clean/work"), _scores(f"{root}/faulty/work")
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)
    ours, theirs = manifest.outputs["coyo_synth"], clean.outputs["coyo_synth"]
    assert [s.md5sum for s in ours.shards] == [s.md5sum for s in theirs.shards]
    assert ours.samples == theirs.samples == manifest.selection["coyo_synth"].kept
    keys = [s.key for sh in ours.shards for s in read_shard(sh.url)]
    assert len(keys) == len(set(keys)) == ours.samples  # nothing duplicated, nothing lost


def test_persistent_failure_names_the_object_and_publishes_nothing(corpus, s3_endpoint, monkeypatch):
    root, tasks = corpus["root"], corpus["tasks"]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail fast: the defaults would retry for minutes
    monkeypatch.setenv("CURATION_S3FS_RETRIES", "1")
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("slowdown", "internal")) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        with pytest.raises(OSError, match=rf"{root}/corpus/coyo_synth: An error occurred \((SlowDown|InternalError)\)"):
            score_local(tasks, ScorerSpec("basic"), f"{root}/down/work")  # the plan lists the shards: refused there
        p.only = lambda method, path: method in ("PUT", "POST") and "/down/" in path
        report = score_local(tasks, ScorerSpec("basic"), f"{root}/down/work")
        assert len(report.failed) == len(tasks)
        for r in report.shards:  # each names the score file it could not publish, and the store's last answer
            assert r.out in r.failed and ("SlowDown" in r.failed or "InternalError" in r.failed), r.failed
        # reads work, every write fails: the reshard stops at its first shard and nothing becomes visible
        p.only = lambda method, path: method in ("PUT", "POST") and "/down/out/" in path and "curate.lock" not in path
        with pytest.raises(OSError, match=rf"{root}/down/out/coyo_synth/.*\.tar: An error occurred \((SlowDown|InternalError)\)"):
            curate(f"{root}/clean/work", POLICY, f"{root}/down/out", ReshardConfig(max_samples=5), use_ray=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    fs = _fs(s3_endpoint)
    assert fs.find(f"{root[5:]}/down/out") == []
    assert [u for u in fs.find(f"{root[5:]}/down/work") if u.endswith(".parquet") and "_catalog" not in u] == []


def test_cut_body_in_a_tar_stream_resumes_by_range_and_checks_the_etag(corpus, s3_endpoint, monkeypatch):
    shard = f"{corpus['root']}/cut/00000.tar"  # a copy: the end of this test rewrites it
    _fs(s3_endpoint).copy(corpus["tasks"][0].url[5:], shard[5:])
    clean = [(s.key, s.caption, s.error) for s in read_shard(shard)]
    key_path = "/" + shard[5:]
    gets = []

    def first_get(method: str, path: str) -> bool:
        if method == "GET" and path.split("?")[0] == key_path:
            gets.append(path)
            return len(gets) == 1
        return False

    with FaultProxy(s3_endpoint, rate=1.0, kinds=("cut",), only=first_get) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        assert [(s.key, s.caption, s.error) for s in read_shard(shard)] == clean
    ranges = [r for m, path, r in p.history if m == "GET" and path.split("?")[0] == key_path]
    assert [f.kind for f in p.injected] == ["cut"] and len(ranges) == 2 and ranges[0] == ranges[1] and ranges[0]

    # the object is rewritten between the cut and the retry: the resumed range is refused (If-Match: the ETag at open)
    gets.clear()

    def rewrite_after_cut(method: str, path: str) -> bool:
        if method == "GET" and path.split("?")[0] == key_path:
            gets.append(path)
            if len(gets) == 2:
                _fs(s3_endpoint).pipe_file(shard[5:], b"\0" * 10240)
            return len(gets) == 1
        return False

    with FaultProxy(s3_endpoint, rate=1.0, kinds=("cut",), only=rewrite_after_cut) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        with pytest.raises(OSError, match=shard):
            list(read_shard(shard))



def _write_in_pieces(url: str, data: bytes, opts: dict) -> None:
    with storage.atomic_write(url, opts) as f:  # as a shard is written: member by member
        for i in range(0, len(data), 2**20):
            f.write(data[i:i + 2**20])


def test_multipart_upload_under_faults_completes_or_leaves_nothing(s3_endpoint, s3_bucket, monkeypatch):
    """A shard larger than s3fs's block is a multipart upload (here 5 MiB parts, S3's minimum):
    faulty part uploads are retried to the same bytes; a store that refuses every part upload
    ends in an error naming the object, no object, and the upload aborted (no parts left billed)."""
    import os

    import boto3

    data = os.urandom(11 * 2**20)  # 3 parts
    opts = {"default_block_size": 5 * 2**20}
    url = f"{s3_bucket}/multipart/big.tar"
    with FaultProxy(s3_endpoint, rate=0.25, seed=2, kinds=("slowdown", "internal", "reset_before", "delay"),
                    delay_s=0.02) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        _write_in_pieces(url, data, opts)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert storage.read_bytes(url) == data
    parts = [(m, path) for m, path, _ in p.history if m == "PUT" and "partNumber=" in path]
    assert len({path for _, path in parts}) == 3 and p.injected, p.counts()  # a multipart upload, met by faults

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("CURATION_S3FS_RETRIES", "1")
    broken = f"{s3_bucket}/multipart/broken.tar"
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("internal",), only=lambda m, path: "partNumber=2" in path) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        with pytest.raises(OSError, match=broken):
            _write_in_pieces(broken, data, opts)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert not _fs(s3_endpoint).exists(broken[5:])
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket[5:].split("/")[0]
    assert not [u for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) if "broken" in u["Key"]]

def test_faults_benchmark_smoke(s3_endpoint):
    """``benchmarks/faults.py --smoke`` (2 shards, 20 % of requests faulty) on the test's S3 endpoint."""
    from benchmarks.faults import parse, run

    res = run(parse(["--smoke", "--endpoint", s3_endpoint]))
    assert res["faults_injected"] > 0 and res["runs_completed"] == 1, res
    assert res["identical"] and res["samples_lost"] == 0 and res["samples_duplicated"] == 0, res
