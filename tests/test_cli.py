"""The README's commands: `curate demo` runs end to end, `curate inspect` reports errors."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from curation.cli import app


def test_demo_end_to_end_tiny(tmp_path):
    r = subprocess.run([sys.executable, "-m", "curation.cli", "demo", "--out", str(tmp_path / "demo"), "--size", "tiny"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["read_check"]["disagreements"] == 0
    assert report["read_check"]["samples"] == sum(d["samples"] for d in report["corpus"]["datasets"].values())
    assert "0 disagreements with the ground truth" in r.stdout
    # every sample scored exactly once by each scorer, and the filter separates mismatched captions
    for run in report["scoring"]:
        assert not run["failed"] and run["rows"] == report["read_check"]["samples"]
    assert report["clip_auc_clean_vs_mismatched"]["coyo_synth"] >= 0.9
    # the curated output drops most injected noise and keeps most clean samples
    assert report["noise_dropped_fraction"] >= 0.5 and report["clean_kept_fraction"] >= 0.8
    from curation.manifest import load_manifest

    m = load_manifest(report["manifest"]["path"])
    assert m.id == report["manifest"]["id"] and len(m.stages) == 5


def test_inspect_counts_and_errors(noisy_corpus):
    out, result = noisy_corpus
    r = CliRunner().invoke(app, ["inspect", f"{out}/coyo_synth", f"{out}/video_synth", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    n_pairs = sum(s.nsamples for s in result.shards["coyo_synth"])
    assert data["datasets"]["coyo_synth"]["samples"] == n_pairs
    assert data["datasets"]["coyo_synth"]["pair"] == n_pairs
    unreadable = result.counts["coyo_synth"].get("corrupt_image", 0) + result.counts["coyo_synth"].get("truncated_member", 0)
    assert data["datasets"]["coyo_synth"]["errors"] == unreadable
    assert any("corrupt image" in e[2] for e in data["errors"])


def test_cli_errors_are_clear(tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such shard" in r.output
    r = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x"), "--size", "enormous"])
    assert r.exit_code == 2 and "unknown size" in r.output
