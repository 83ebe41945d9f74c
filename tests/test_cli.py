"""The README's commands: `curate demo` runs end to end, `curate inspect` reports errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from curation.app.cli import app


def test_demo_end_to_end_tiny(tmp_path):
    """The README's first command, at the smallest size, as a new user runs it: a fresh HOME (no
    ~/.prefect), no Prefect variables, so the flow runs on Prefect's temporary local server. The
    curated NVILA trains on one Ray Train worker group beside the uncurated arm, as by default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["HOME"] = str(tmp_path / "home")
    os.makedirs(env["HOME"])
    r = subprocess.run([sys.executable, "-m", "curation.app.cli", "demo", "--out", str(tmp_path / "demo"), "--size", "tiny"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=env["HOME"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the run's Prefect database is its own, migrated before the server started, and nothing locked
    assert (tmp_path / "demo" / ".prefect" / "prefect.db").is_file()
    assert "database is locked" not in r.stderr and "Timed out" not in r.stderr
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["read_check"]["disagreements"] == 0
    assert report["read_check"]["samples"] == sum(d["samples"] for d in report["corpus"]["datasets"].values())
    # every sample scored exactly once by each scorer, and the filter separates mismatched captions
    for run in report["scoring"]:
        assert not run["failed"] and run["rows"] == report["read_check"]["samples"]
    assert {run["scorer"] for run in report["scoring"]} == {"basic", "clip", "deltaloss"}
    assert report["clip_auc_clean_vs_mismatched"]["coyo_synth"] >= 0.9
    # the curated output drops most injected noise and keeps most clean samples
    assert report["noise_dropped_fraction"] >= 0.5 and report["clean_kept_fraction"] >= 0.8
    from curation.selection.manifest import load_manifest

    m = load_manifest(report["manifest"]["path"])
    assert m.id == report["manifest"]["id"] and len(m.stages) == 5
    # the tiny NVILA trained through the five stages from that manifest
    assert [s["stage"] for s in report["training"]["stages"]] == ["align", "vision_pretrain", "pretrain", "image_sft", "video_sft"]
    assert report["training"]["manifest_id"] == m.id
    # one Ray Train worker process trained the five stages, beside the uncurated arm in the flow's process
    assert len({s["pid"] for s in report["training"]["stages"]}) == 1
    assert report["training"]["stages"][0]["pid"] != report["uncurated"]["training"]["stages"][0]["pid"]
    assert all(s["epochs"] and s["steps"] >= 1 for s in report["training"]["stages"])  # budgets in epochs
    # curate eval of the image_sft checkpoint on fresh clean images: accuracy and a gallery
    ev = report["caption_eval"]
    assert ev["checkpoint_stage"] == "image_sft" and ev["images"] == 200 and os.path.isfile(ev["gallery"]["png"])
    # beside it, the same NVILA trained on the uncurated corpus with the same steps up to image_sft,
    # captioning the same held-out images (tests/test_learning.py checks that training teaches)
    un = report["uncurated"]
    steps = {s["stage"]: s["steps"] for s in report["training"]["stages"]}
    assert [(s["stage"], s["steps"]) for s in un["training"]["stages"]] == [(st, steps[st]) for st in list(steps)[:4]]
    assert un["caption_eval"]["images"] == ev["images"] and sum(un["samples"].values()) > sum(report["curated_samples"].values())
    assert set(report["timings"]) >= {"synthesize", "score", "train_curated_and_uncurated", "eval", "total"}
    assert all(t["cpu_s"] >= 0 and t["wall_s"] >= 0 for t in report["timings"].values())
    html = (tmp_path / "demo" / "demo_report.html").read_text()
    assert "Caption accuracy" in html and "What curation buys" in html and "<style>" in html
    md = (tmp_path / "demo" / "demo_report.md").read_text()
    assert "{'" not in md and "': " not in md  # figures as tables and text, not Python reprs
    # score distributions, kept/dropped, noise caught, loss curves, both caption galleries
    assert html.count("data:image/png;base64,") >= 6


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


def test_inspect_keeps_samples_read_before_damage(noisy_corpus, tmp_path):
    """A truncated .tar.gz, an empty shard and a shard that is not a tar, beside good shards:
    every sample before the damage is counted, each bad shard is named, the good shards' counts stay."""
    import gzip
    import shutil

    from curation.data.shards import count_samples, list_shards

    out, result = noisy_corpus
    bad = tmp_path / "coyo_synth"
    bad.mkdir()
    good = list_shards(f"{out}/coyo_synth")
    tar = open(good[0], "rb").read()
    gz = gzip.compress(tar, mtime=0)
    (bad / "cut.tar.gz").write_bytes(gz[: len(gz) // 2])
    (bad / "empty.tar").write_bytes(b"")
    (bad / "html.tar").write_bytes(b"<html>503 Service Unavailable</html>" * 20)
    for u in good[1:]:
        shutil.copy(u, bad)
    r = CliRunner().invoke(app, ["inspect", str(bad), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    n_good = sum(count_samples(u) for u in good[1:])
    counted = data["datasets"]["coyo_synth"]["samples"]
    assert n_good < counted < n_good + count_samples(good[0])  # some of the cut shard's samples, not all
    assert data["datasets"]["<unreadable shards>"]["shards"] == 2
    by_where = {e[1]: e[2] for e in data["errors"]}
    assert "empty shard" in by_where[str(bad / "empty.tar")]
    assert "checksum mismatch" in by_where[str(bad / "html.tar")]
    assert any("truncated or corrupt compressed stream" in e[2] for e in data["errors"] if e[0] == "coyo_synth")
    r = CliRunner().invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 0 and "Aborted" not in r.output and "empty shard" in r.output


def test_score_summary_keeps_bracketed_hash(capsys):
    """Rich would take ``[abcdef...]`` for a markup tag and drop it."""
    from curation.app.cli import out_console, score_summary_line

    report = {"scorer": "clip", "config_hash": "abcdef0123456789", "scored": 3, "skipped": 1, "failed": [],
              "rows": 30, "sample_errors": 2, "seconds": 1.5}
    out_console.print(score_summary_line(report), markup=False, highlight=False)
    assert "clip [abcdef0123456789]: 3 scored, 1 already done" in capsys.readouterr().out


def test_demo_report_renders_bold_and_code_escaped():
    from flows.demo_report import md_to_html

    html = md_to_html("- kept **97.0%** of `x`\n\ntop-1 0.0% -> **78.1%** <b>raw</b>")
    assert "<li>kept <strong>97.0%</strong> of <code>x</code></li>" in html
    assert "<p>top-1 0.0% -&gt; <strong>78.1%</strong> &lt;b&gt;raw&lt;/b&gt;</p>" in html and "**" not in html
