"""The demo's report as a reader sees it: figures in tables and sentences (no Python reprs), a
stylesheet, and the HTML page rendered by a real headless Chromium (Debian's ``chromium``, driven
by Playwright), whose screenshot is kept as a test artefact (``$TEST_ARTIFACTS`` or
``test-artifacts/`` at the repository root)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from flows.demo_report import md_to_html, report_markdown, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPR = re.compile(r"\{'|':\s|\['|\bNone\b")  # what a dict, a list of strings or None looks like when printed


def _eval(acc: float, all_right: float) -> dict:
    return {"checkpoint_stage": "image_sft", "images": 200, "caption_accuracy": acc, "all_right": all_right,
            "per_attribute": {"color": 0.96, "shape": 0.81, "pos": None, "bg": 0.99}, "position_stated": 0.0,
            "heldout_loss": {"pair": 0.512}, "gallery": {"png": ""}}


def _stages(names, epochs=True):
    return [{"stage": s, "epochs": 2 if epochs else None, "steps": 10 * (i + 1), "first_loss": 6.1, "last_loss": 0.9,
             "heldout_loss": {"pair": 0.95, "video": 1.2}} for i, s in enumerate(names)]


def _report(out: str) -> dict:
    """A report shaped as ``flows.demo.demo_flow`` writes it (the figures are made up)."""
    five = ["align", "vision_pretrain", "pretrain", "image_sft", "video_sft"]
    return {
        "out": out, "size": "small", "seed": 0, "manifest": {"id": "abc123", "path": f"{out}/curated/manifest.json"},
        "curated_samples": {"coyo_synth": 900, "cc3m_synth": 400},
        "read_check": {"samples": 2000, "unreadable": 40, "disagreements": 0},
        "noise_dropped_fraction": 0.976, "clean_kept_fraction": 0.993,
        "clip_auc_clean_vs_mismatched": {"coyo_synth": 0.998, "cc3m_synth": 0.991},
        "noise_caught": [{"dataset": "coyo_synth", "noise": "clean", "samples": 900, "kept": 894, "main_reason": None},
                         {"dataset": "coyo_synth", "noise": "mismatched_caption", "samples": 60, "kept": 1,
                          "main_reason": "threshold:clip_filter"}],
        "training": {"stages": _stages(five)}, "caption_eval": _eval(0.944, 0.70),
        "uncurated": {"samples": {"coyo_synth": 1200, "cc3m_synth": 600}, "training": {"stages": _stages(five[:4], False)},
                      "caption_eval": _eval(0.71, 0.31), "manifest": {"id": "def456", "path": ""}},
        "timings": {"synthesize": {"wall_s": 12.3, "cpu_s": 11.0}, "total": {"wall_s": 480.0, "cpu_s": 900.5}},
    }


def test_report_has_tables_and_text_not_reprs(tmp_path):
    md = report_markdown(_report(str(tmp_path)), {}, str(tmp_path))
    assert not REPR.search(md), REPR.search(md)
    # curated beside uncurated: both accuracies and both all-attributes-right rates, the same steps
    row = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| curated") or ln.startswith("| uncurated")}
    assert "**94.4%**" in row["curated"] and "**70.0%**" in row["curated"]
    assert "**71.0%**" in row["uncurated"] and "**31.0%**" in row["uncurated"]
    assert "| curated | 1300 | 100 |" in md and "| uncurated | 1800 | 100 |" in md
    assert "+23.4 points" in md
    assert "| pretrain | 2 | 30 | 6.100 | 0.900 | pair 0.950, video 1.200 |" in md
    assert "| synthesize | 12.3 | 11.0 |" in md and "| position | - |" in md


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    return exe


def test_html_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2))
    ax.plot([0, 1, 2], [3, 1, 2])
    fig.savefig(tmp_path / "curve.png", dpi=60)
    plt.close(fig)
    _, html_path = write_report(str(tmp_path), _report(str(tmp_path)), {"loss_curves": str(tmp_path / "curve.png")})
    artefacts = os.environ.get("TEST_ARTIFACTS") or os.path.join(ROOT, "test-artifacts")
    os.makedirs(artefacts, exist_ok=True)
    shot = os.path.join(artefacts, "demo_report.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto("file://" + html_path)
            page.screenshot(path=shot, full_page=True)
            tables = page.locator("table")
            assert tables.count() == 7  # summary, curated vs uncurated, attributes, CLIP, noise, stages, timings
            for i in range(tables.count()):
                assert tables.nth(i).is_visible() and tables.nth(i).bounding_box()["width"] > 150
            text = page.inner_text("body")
            assert not REPR.search(text) and "What curation buys" in text and "94.4%" in text
            # the stylesheet applies: collapsed, ruled tables, a shaded header row, figures right-aligned
            style = page.evaluate("""() => { const t = document.querySelector('table'), th = t.querySelector('th');
                return [getComputedStyle(t).borderCollapse, getComputedStyle(th).backgroundColor,
                        getComputedStyle(document.body).maxWidth]; }""")
            assert style[0] == "collapse" and style[1] != "rgba(0, 0, 0, 0)" and style[2] != "none"
            assert page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            cell = page.locator("td", has_text="70.0%").first  # curated, all attributes right
            assert cell.evaluate("e => getComputedStyle(e).textAlign") == "right"
        finally:
            browser.close()
    assert os.path.getsize(shot) > 20_000


def test_md_to_html_escapes_raw_html():
    html = md_to_html("<script>alert(1)</script>\n\n| a |\n|---|\n| <b>x</b> |")
    assert "<script>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<style>" in html
