"""Calibrated filters on small data: thresholds read off trusted scores, the motion score on
real encoded clips, the one-to-one MMC4 image rule, and the caption rule naming its reason
(real Parquet score stores, real DuckDB, real video encoding and decoding)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.selection.calibrate import CalibrationError, TrustedColumn, calibrate_policy, quantile_threshold, score_trusted
from curation.selection.policy import load_policy, run_selection
from curation.scoring.store import ScoreStore
from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from scorers.basic import BasicScorer, motion_score
from scorers.clip import one_to_one_scores


def _work(tmp_path, rows: list[dict], scorer_columns: dict[str, list[str]]) -> str:
    """A score store with one Parquet file per scorer (identity columns + that scorer's columns)."""
    work = tmp_path / "work"
    ident = ["dataset", "shard", "key", "kind", "error"]
    for scorer, cols in scorer_columns.items():
        for ds in sorted({r["dataset"] for r in rows}):
            out = work / "scores" / scorer / f"dataset={ds}"
            out.mkdir(parents=True)
            table = [{c: r.get(c) for c in ident + cols} for r in rows if r["dataset"] == ds]
            for t, r in zip(table, [r for r in rows if r["dataset"] == ds]):
                t["error"] = r.get(f"{scorer}_error")
            pq.write_table(pa.Table.from_pylist(table), out / "00000.parquet")
    return str(work)


def _decide(work: str, policy: dict) -> dict[str, str | None]:
    result = run_selection(ScoreStore(work), load_policy(policy))
    return {x["key"]: x["dropped_by"] for x in pq.read_table(result.decisions_url).to_pylist()}


# --------------------------------------------------------------------------- calibration


def test_quantile_threshold_skips_missing_values_and_checks_its_input():
    values = [None, float("nan"), *range(101)]  # 0..100: the 5th percentile is 5
    t, n = quantile_threshold(values, 0.05)
    assert n == 101 and math.isclose(t, 5.0)
    with pytest.raises(CalibrationError, match="no trusted scores"):
        quantile_threshold([None, float("nan")], 0.01)
    with pytest.raises(CalibrationError, match="quantile"):
        quantile_threshold([1.0], 1.5)


def test_calibrated_thresholds_are_per_dataset_and_recorded_in_policy_and_manifest_form():
    policy = {"defaults": [{"rule": "valid", "min_caption_words": 2}],
              "datasets": {"web": [{"rule": "dedup"}, {"rule": "threshold", "column": "clip_score", "min": 0.3}],
                           "clips": [{"rule": "threshold", "column": "motion", "min": 0.5},
                                     {"rule": "threshold", "column": "clip_score", "max": 2.0}]}}
    rng = np.random.default_rng(0)
    web = TrustedColumn("trusted/web", list(rng.normal(0.9, 0.02, 400)))
    clips = TrustedColumn("trusted/clips", list(rng.uniform(0.05, 0.1, 200)))
    out = calibrate_policy(policy, {"web": {"clip_score": web}, "clips": {"motion": clips}}, quantile=0.01)
    web_rule = out["datasets"]["web"][1]
    assert web_rule["min"] == pytest.approx(np.quantile(web.values, 0.01), abs=1e-4)
    assert web_rule["min"] <= np.quantile(web.values, 0.01)  # rounded down: never stricter than the quantile
    assert web_rule["calibration"] == {"trusted": "trusted/web", "column": "clip_score", "quantile": 0.01,
                                       "samples": 400, "value": round(float(np.quantile(web.values, 0.01)), 6)}
    assert 0.05 <= out["datasets"]["clips"][0]["min"] < 0.06  # each dataset from its own trusted scores
    assert "calibration" not in out["datasets"]["clips"][1]  # a max-only rule is not calibrated
    assert policy["datasets"]["web"][1]["min"] == 0.3  # the input policy is left as it was
    # the record survives validation, so the manifest (which stores the validated policy) carries it
    dumped = load_policy(out).model_dump(mode="json")
    assert dumped["datasets"]["web"][1]["calibration"]["trusted"] == "trusted/web"
    assert load_policy(out).fingerprint() != load_policy(policy).fingerprint()


def test_calibration_with_no_trusted_values_names_the_rule():
    policy = {"datasets": {"web": [{"rule": "threshold", "column": "clip_score", "min": 0.3}]}}
    with pytest.raises(CalibrationError, match="datasets.web: clip_score from t/web"):
        calibrate_policy(policy, {"web": {"clip_score": TrustedColumn("t/web", [None])}})


# --------------------------------------------------------------------------- motion


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Trusted clean clips, and a corpus of clean and static clips (real H.264)."""
    root = tmp_path_factory.mktemp("clips")
    synthesize(str(root / "trusted"), SynthConfig(seed=1, datasets=[DatasetSpec("trusted_clips", "video", 16, {}, 16)]))
    synthesize(str(root / "corpus"), SynthConfig(seed=2, datasets=[
        DatasetSpec("video", "video", 16, {"static_video": 0.5}, 16)]))
    return root


def test_motion_score_separates_static_from_moving_frames():
    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(120, 6, size=(8, 64, 64, 3)), 0, 255).astype(np.uint8)  # per-frame sensor noise only
    moving = base.copy()
    for t in range(8):
        moving[t, 20:36, 4 + 6 * t: 20 + 6 * t] = (250, 20, 20)
    assert motion_score(list(base)) < 0.005
    assert motion_score(list(moving)) > 0.03
    assert motion_score(list(base[:1])) is None


def test_calibrated_motion_threshold_drops_static_clips(clips):
    import polars as pl

    trusted = score_trusted([str(clips / "trusted" / "trusted_clips")], [BasicScorer()])
    threshold, n = quantile_threshold(trusted["motion"], 0.005)
    assert n == 16 and threshold > 0.01
    truth = pl.read_parquet(clips / "corpus" / "ground_truth.parquet")
    scored = score_trusted([str(clips / "corpus" / "video")], [BasicScorer()])
    by_noise: dict[str, list[float]] = {}
    for noise, m in zip(truth.sort("key")["noise"].to_list(), scored["motion"]):
        by_noise.setdefault(noise, []).append(m)
    assert by_noise["static_video"] and all(m < threshold for m in by_noise["static_video"])
    assert all(m >= threshold * 0.8 for m in by_noise["clean"])  # clean clips move like trusted ones


# --------------------------------------------------------------------------- MMC4 and captions


def test_one_to_one_assignment_exposes_a_distractor_image():
    # images 0 and 1 are described by sentences 0 and 2; image 2 (an ad) looks most like
    # sentence 0 too, but less than image 0 does; sentence 1 is filler
    sim = np.array([[0.90, 0.10, 0.20], [0.15, 0.12, 0.88], [0.60, 0.05, 0.30]])
    assert sim.max(axis=1).min() == pytest.approx(0.60)  # best-sentence scores hide it
    assigned = one_to_one_scores(sim)
    assert assigned.tolist() == pytest.approx([0.90, 0.88, 0.05])
    assert one_to_one_scores(np.array([[0.9], [0.8]])).tolist() == pytest.approx([0.9, -1.0])  # no sentence left


def test_document_rule_and_caption_rule_name_their_reasons(tmp_path):
    rows = [
        {"dataset": "docs", "shard": "0", "key": "clean", "kind": "interleaved", "clip_assigned_min": 0.8, "caption_words": 30},
        {"dataset": "docs", "shard": "0", "key": "ad", "kind": "interleaved", "clip_assigned_min": 0.05, "caption_words": 30},
        {"dataset": "docs", "shard": "0", "key": "empty", "kind": "interleaved", "clip_assigned_min": 0.8,
         "caption_words": 0, "deltaloss_error": "deltaloss: no caption tokens"},
        {"dataset": "docs", "shard": "0", "key": "one_word", "kind": "interleaved", "clip_assigned_min": 0.8,
         "caption_words": 1},
        {"dataset": "docs", "shard": "0", "key": "dl_failed", "kind": "interleaved", "clip_assigned_min": 0.8,
         "caption_words": 30, "deltaloss_error": "deltaloss: out of memory"},
    ]
    work = _work(tmp_path, rows, {"basic": ["caption_words"], "clip": ["clip_assigned_min"], "deltaloss": []})
    policy = {"defaults": [{"rule": "valid", "decodable": False, "min_caption_words": 2}],
              "datasets": {"docs": [{"rule": "threshold", "column": "clip_assigned_min", "min": 0.4, "name": "distractor"}]}}
    assert _decide(work, policy) == {"clean": None, "ad": "distractor", "empty": "valid:min_caption_words",
                                     "one_word": "valid:min_caption_words", "dl_failed": "scorer_error:deltaloss"}
