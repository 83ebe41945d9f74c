"""Selection policies, byte-exact resharding and manifests, on a scored synthetic corpus."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from conftest import noisy_config
from curation.data import storage
from curation.data.compat import ray_read_webdataset, webdataset_reader
from curation.selection.curate import curate, kept_keys
from curation.scoring.dfn import FilterTrainConfig, train_filter
from curation.scoring.engine import ScorerSpec, ShardTask, score_local
from curation.selection.manifest import load_manifest
from curation.selection.policy import PolicyError, load_policy, run_selection
from curation.selection.reshard import ReshardConfig, ReshardError
from curation.data.shards import dataset_of, iter_raw_samples, list_shards
from curation.scoring.store import ScoreStore
from curation.corpus.synth import DatasetSpec, SynthConfig, load_ground_truth, synthesize

POLICY = {
    "defaults": [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 1}],
    "datasets": {
        "coyo_synth": [
            {"rule": "dedup", "column": "sha256"},
            {"rule": "near_dedup", "column": "phash", "max_distance": 4},
            {"rule": "threshold", "column": "clip_score", "min": 0.3},
        ],
        "mmc4_synth": [{"rule": "dedup"}, {"rule": "top_fraction", "column": "clip_score", "fraction": 0.5}],
        "video_synth": [{"rule": "dedup"}, {"rule": "top_k", "column": "clip_score", "k": 5}],
    },
    "stages": {"align": {"coyo_synth": 1.0}, "pretrain": {"mmc4_synth": 1.0, "coyo_synth": 0.5},
               "video_sft": {"video_synth": 1.0}},
}


def _score(corpus: str, work: str, filter_dir: str) -> None:
    tasks = [ShardTask(u, dataset_of(u)) for ds in ("coyo_synth", "mmc4_synth", "video_synth")
             for u in list_shards(f"{corpus}/{ds}")]
    for spec in (ScorerSpec("basic"), ScorerSpec("clip", {"model": filter_dir, "num_frames": 2}, batch_size=32)):
        r = score_local(tasks, spec, work)
        assert not r.failed


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A noisy corpus scored by the basic scorer and a DFN filter trained on clean pairs."""
    root = tmp_path_factory.mktemp("curation")
    corpus, work = str(root / "corpus"), str(root / "work")
    synthesize(corpus, noisy_config(seed=5, pairs=120, docs=16, videos=14))
    trusted = SynthConfig(seed=99, datasets=[DatasetSpec("trusted", "pair", 400, {}, 200)])
    synthesize(str(root / "trusted"), trusted)
    train_filter(str(root / "trusted" / "trusted"), str(root / "dfn"),
                 FilterTrainConfig(steps=60, batch_size=64, warmup=10, shuffle_buffer=400))
    _score(corpus, work, str(root / "dfn"))
    return {"root": root, "corpus": corpus, "work": work, "dfn": str(root / "dfn")}


def _decisions(url: str) -> dict[tuple[str, str], str | None]:
    import duckdb

    return {(d, k): r for d, k, r in duckdb.sql(f"SELECT dataset, key, dropped_by FROM read_parquet('{url}')").fetchall()}


def test_policy_drops_the_noise_its_rules_target(scored):
    result = run_selection(ScoreStore(scored["work"]), load_policy(POLICY))
    decided = _decisions(result.decisions_url)
    gt = load_ground_truth(scored["corpus"])
    assert len(decided) == gt.height  # every scored sample decided exactly once
    by_noise: dict[str, list[str | None]] = {}
    for r in gt.filter(gt["dataset"] == "coyo_synth").iter_rows(named=True):
        by_noise.setdefault(r["noise"], []).append(decided[("coyo_synth", r["key"])])
    assert all(x == "unreadable" for n in ("corrupt_image", "truncated_member") for x in by_noise[n])
    assert all(x == "valid:min_size" for x in by_noise["tiny_image"])
    assert all(x in ("valid:min_size", "valid:max_aspect_ratio") for x in by_noise["extreme_aspect"])
    assert all(x == "valid:min_caption_words" for x in by_noise["empty_caption"])
    assert all(x == "dedup:sha256" for x in by_noise["exact_duplicate"])
    assert all(x == "near_dedup:phash" for x in by_noise["near_duplicate"])
    # a tiny filter trained for seconds: most, not all, mismatches and noise images fall under 0.3
    for n in ("mismatched_caption", "noise_image", "gibberish_caption"):
        assert sum(x is not None for x in by_noise[n]) / len(by_noise[n]) >= 0.75, (n, by_noise[n])
    clean = by_noise["clean"]
    assert sum(x is None for x in clean) / len(clean) >= 0.9, [x for x in clean if x]
    # the duplicates' sources survive: dedup keeps one
    for r in gt.filter(gt["noise"] == "exact_duplicate").iter_rows(named=True):
        if r["dataset"] == "coyo_synth":
            assert decided[("coyo_synth", r["source_key"])] is None
    for ds, c in result.counts.items():
        assert c["kept"] + sum(c["dropped"].values()) == c["scored"] == gt.filter(gt["dataset"] == ds).height


def test_ranking_rules_keep_top_within_each_dataset(scored):
    store = ScoreStore(scored["work"])
    result = run_selection(store, load_policy(POLICY))
    decided = _decisions(result.decisions_url)
    # mmc4: top 50 % of the documents still kept after the error and dedup rules, by clip_score
    rows = store.query_pl("SELECT key, clip_score, basic_error, sha256 FROM scores WHERE dataset = 'mmc4_synth'")
    before = [r for r in rows.iter_rows(named=True) if decided[("mmc4_synth", r["key"])] in (None, "top_fraction:clip_score")]
    kept = [r for r in before if decided[("mmc4_synth", r["key"])] is None]
    assert len(kept) == math.ceil(0.5 * len(before))
    assert min(r["clip_score"] for r in kept) >= max(r["clip_score"] for r in before if r not in kept)
    assert result.counts["video_synth"]["kept"] == 5


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p["datasets"]["coyo_synth"].append({"rule": "threshold", "column": "clip_scor", "min": 0}),
     r"datasets\.coyo_synth\[3\]: unknown column 'clip_scor'"),
    (lambda p: p["datasets"].update(laion={"rule": "dedup"} and [{"rule": "dedup"}]), r"datasets\.laion: no scores for dataset"),
    (lambda p: p["datasets"]["mmc4_synth"][1].update(fraction=0), r"fraction must be in \(0, 1\]"),
    (lambda p: p["datasets"]["mmc4_synth"][1].update(fraction=1.5), r"fraction must be in \(0, 1\]"),
    (lambda p: p["stages"].update(warmup={"coyo_synth": 1}), r"unknown stage 'warmup'"),
    (lambda p: p["stages"]["align"].update(nope=1.0), r"stages\.align\.nope"),
    (lambda p: p["datasets"]["coyo_synth"].append({"rule": "blur"}), r"datasets\.coyo_synth\[3\]"),
])
def test_bad_policies_are_refused_before_work(scored, tmp_path, mutate, match):
    pol = json.loads(json.dumps(POLICY))
    mutate(pol)
    with pytest.raises(PolicyError, match=match):
        curate(scored["work"], pol, str(tmp_path / "out"), use_ray=False)
    assert not (tmp_path / "out").exists()


def _input_members(corpus: str) -> dict[tuple[str, str], dict[str, bytes]]:
    out = {}
    for ds in ("coyo_synth", "mmc4_synth", "video_synth"):
        for u in list_shards(f"{corpus}/{ds}"):
            with open(u, "rb") as f:
                for raw in iter_raw_samples(f):
                    out[(ds, raw.key)] = raw.members
    return out


@pytest.fixture(scope="module")
def curated(scored):
    """Resharded in parallel on a local Ray (the other tests reshard in-process and must agree)."""
    import ray

    out = str(scored["root"] / "curated")
    try:
        manifest, url = curate(scored["work"], POLICY, out, ReshardConfig(max_samples=16, workers=2), use_ray=True)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    return manifest, url, out


def test_curated_shards_are_byte_exact_and_complete(scored, curated):
    manifest, url, out = curated
    keys = kept_keys(manifest.decisions)
    inputs = _input_members(scored["corpus"])
    for ds, o in manifest.outputs.items():
        want = {k for (d, _s), ks in keys.items() if d == ds for k in ks}
        got = {}
        for s in o.shards:
            with open(s.url, "rb") as f:
                for raw in iter_raw_samples(f):
                    got[raw.key] = raw.members
            stats = json.loads(open(s.url[:-4] + "_stats.json").read())
            assert stats["nsamples"] == s.nsamples and sum(stats["sources"].values()) == s.nsamples
            assert s.nsamples <= 16
        assert set(got) == want and o.samples == len(want) == manifest.selection[ds].kept
        for k, members in got.items():
            assert members == inputs[(ds, k)]  # same members, same order, same bytes


def test_curated_shards_read_by_webdataset_wids_and_ray(curated):
    import ray
    import wids

    manifest, _, _ = curated
    for ds, o in manifest.outputs.items():
        urls = [s.url for s in o.shards]
        assert len(list(webdataset_reader(urls))) == o.samples
        index = json.loads(open(o.index).read())
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert [e["md5sum"] for e in index["shardlist"]] == [s.md5sum for s in o.shards]
        w = wids.ShardListDataset(o.index)
        assert len(w) == o.samples
        assert w[len(w) - 1]["__key__"]
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        urls = [s.url for o in manifest.outputs.values() for s in o.shards]
        assert ray_read_webdataset(urls).count() == sum(o.samples for o in manifest.outputs.values())
    finally:
        ray.shutdown()


def test_manifest_is_content_addressed_and_reproducible(scored, curated, tmp_path):
    manifest, url, out = curated
    m = load_manifest(url)
    assert m.id == manifest.id and len(m.id) == 32
    assert {s.stage for s in m.stages} == {"align", "pretrain", "video_sft"}
    assert m.stage_datasets("pretrain") == {"mmc4_synth": 1.0, "coyo_synth": 0.5}
    assert {s.name for s in m.scorers} == {"basic", "clip"}
    assert all(i.checksum and i.size for refs in m.inputs.values() for i in refs)
    assert "WITH" in m.policy_sql
    # the same inputs, scores and policy: same id, and every group is found complete
    again, _ = curate(scored["work"], POLICY, out, ReshardConfig(max_samples=16), use_ray=False)
    assert again.id == manifest.id
    # a different policy: a different id
    pol = json.loads(json.dumps(POLICY))
    pol["datasets"]["coyo_synth"][2]["min"] = 0.5
    other, _ = curate(scored["work"], pol, str(tmp_path / "other"), ReshardConfig(max_samples=16), use_ray=False)
    assert other.id != manifest.id
    # a manifest edited by hand no longer verifies
    data = json.loads(open(url).read())
    data["stages"][0]["datasets"]["coyo_synth"] = 2.0
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its content"):
        load_manifest(str(tmp_path / "edited.json"))


def _new_names(out: str, before: set[str]) -> set[str]:
    """Paths under ``out`` not in ``before`` (temp files included: each write makes a new one)."""
    return {os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs} - before


def _reshard_until(args: list[str], out: str, kill_after: int | None) -> int:
    """Run ``curate reshard``; SIGKILL it once ``kill_after`` new files appeared under ``out``
    (None: let it finish). Returns its exit status (-9 when the kill landed mid-run)."""
    import signal
    import subprocess
    import sys
    import time

    before = _new_names(out, set()) if os.path.exists(out) else set()
    proc = subprocess.Popen([sys.executable, "-m", "curation.app.cli", "reshard", *args, "--out", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while kill_after is not None and proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(out) and len(_new_names(out, before)) >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    return proc.returncode


def _tree(out: str) -> dict[str, bytes]:
    """Every shard and index under ``out`` by relative path (group records and stats name the
    output folder, so they differ between folders by design)."""
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs if f.endswith((".tar", ".wids.json"))}


def test_resume_after_real_kills(scored, tmp_path):
    """`curate reshard` in a subprocess, SIGKILLed at seeded random points (the n-th new file
    under its output, temp files included), resumed each time: it ends with exactly the
    shards of an uninterrupted run."""
    import random

    import yaml

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    args = ["--policy", str(tmp_path / "policy.yaml"), "--work", scored["work"], "--max-samples", "8", "--workers", "1"]
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    assert _reshard_until(args, clean, None) == 0
    files = len(_new_names(clean, set()))  # every file an uninterrupted run writes (temp files are gone)
    rng = random.Random(13)
    kills = [_reshard_until(args, resumed, rng.randint(1, max(1, files // 3))) for _ in range(3)]
    assert kills == [-9, -9, -9], f"a kill came after the run had finished: {kills}"
    assert _reshard_until(args, resumed, None) == 0
    want, got = _tree(clean), _tree(resumed)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    a, b = load_manifest(f"{clean}/manifest.json"), load_manifest(f"{resumed}/manifest.json")
    assert [(s.nsamples, s.md5sum) for o in b.outputs.values() for s in o.shards] == \
           [(s.nsamples, s.md5sum) for o in a.outputs.values() for s in o.shards]


def test_shuffle_is_deterministic(scored, tmp_path):
    a, _ = curate(scored["work"], POLICY, str(tmp_path / "a"), ReshardConfig(max_samples=16, shuffle_seed=7), use_ray=False)
    b, _ = curate(scored["work"], POLICY, str(tmp_path / "b"), ReshardConfig(max_samples=16, shuffle_seed=7), use_ray=False)
    c, _ = curate(scored["work"], POLICY, str(tmp_path / "c"), ReshardConfig(max_samples=16), use_ray=False)
    md5 = lambda m: [s.md5sum for o in m.outputs.values() for s in o.shards]  # noqa: E731
    assert md5(a) == md5(b) != md5(c)
    order = lambda m: [k for s in m.outputs["coyo_synth"].shards for k in _keys(s.url)]  # noqa: E731
    assert order(a) != order(c) and sorted(order(a)) == sorted(order(c))


def _keys(url: str) -> list[str]:
    with open(url, "rb") as f:
        return [r.key for r in iter_raw_samples(f)]


def test_changed_input_shard_is_refused(scored, tmp_path):
    corpus = str(tmp_path / "corpus")
    shutil.copytree(scored["corpus"], corpus)
    work = str(tmp_path / "work")
    _score(corpus, work, scored["dfn"])
    victim = list_shards(f"{corpus}/coyo_synth")[1]
    data = bytearray(open(victim, "rb").read())
    data[2000] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(ReshardError, match=f"input shard {victim} .* changed since it was scored"):
        curate(work, POLICY, str(tmp_path / "out"), use_ray=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
def test_s3_end_to_end(s3_bucket, scored):
    corpus, work, out = f"{s3_bucket}/corpus", f"{s3_bucket}/work", f"{s3_bucket}/curated"
    synthesize(corpus, noisy_config(seed=5, pairs=40, docs=8, videos=7))
    tasks = [ShardTask(u, dataset_of(u)) for ds in ("coyo_synth", "mmc4_synth", "video_synth") for u in list_shards(f"{corpus}/{ds}")]
    for spec in (ScorerSpec("basic"), ScorerSpec("clip", {"model": scored["dfn"], "num_frames": 2})):
        assert not score_local(tasks, spec, work).failed
    manifest, url = curate(work, POLICY, out, ReshardConfig(max_samples=10), use_ray=False)
    assert url == f"{out}/manifest.json" and load_manifest(url).id == manifest.id
    assert all(i.url.startswith("s3://") for refs in manifest.inputs.values() for i in refs)
    for ds, o in manifest.outputs.items():
        assert len(list(webdataset_reader([s.url for s in o.shards]))) == o.samples == manifest.selection[ds].kept
        assert storage.exists(o.index)
