"""`curate explore`: sample offsets recorded by scoring, ranged reads, and the web app in a real browser."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import duckdb
import pytest

from conftest import noisy_config
from curation.app.explore.data import Explorer
from curation.app.explore.fetch import Location, read_sample
from curation.corpus.synth import synthesize
from curation.data import storage
from curation.data.shards import dataset_of, list_shards, read_shard
from curation.scoring.engine import ScorerSpec, ShardTask, score_local

POLICY = {
    "defaults": [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 1}],
    "datasets": {"coyo_synth": [{"rule": "dedup", "column": "sha256"},
                                {"rule": "threshold", "column": "caption_words", "min": 8}],
                 "mmc4_synth": [{"rule": "dedup"}]},
    "stages": {"align": {"coyo_synth": 1.0}},
}


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    """A small noisy corpus scored by `basic`, and an explorer over it with a policy."""
    import yaml

    root = tmp_path_factory.mktemp("explore")
    corpus, work = str(root / "corpus"), str(root / "work")
    synthesize(corpus, noisy_config(seed=11, pairs=40, docs=8, videos=6))
    tasks = [ShardTask(u, dataset_of(u)) for ds in ("coyo_synth", "mmc4_synth", "video_synth")
             for u in list_shards(f"{corpus}/{ds}")]
    assert not score_local(tasks, ScorerSpec("basic"), work).failed
    (root / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    before = _tree(work)
    ex = Explorer(work, policy=str(root / "policy.yaml"), cache=str(root / "cache"))
    return {"root": root, "corpus": corpus, "work": work, "ex": ex, "before": before}


def test_scoring_records_offsets_and_one_ranged_read_fetches_a_sample(explored, monkeypatch):
    ex = explored["ex"]
    rows = ex.con.execute("SELECT dataset, shard, key, tar_offset, tar_size FROM basic ORDER BY 1, 2, 3").fetchall()
    assert rows and all(off is not None and size > 0 for _, _, _, off, size in rows)
    import fsspec.implementations.local as local

    import curation.app.explore.fetch as fetch

    # every read of shard bytes goes through fsspec's cat_file with a byte range (one GET with a
    # Range header on S3); the whole-shard scan (open_shard) must not run
    calls: list[tuple] = []
    real_cat = local.LocalFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kw):
        calls.append((path, start, end))
        return real_cat(self, path, start=start, end=end, **kw)

    def no_scan(url, *a, **kw):
        raise AssertionError(f"shard scanned from the start: {url}")

    monkeypatch.setattr(local.LocalFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(fetch, "open_shard", no_scan)
    for ds in ("coyo_synth", "mmc4_synth", "video_synth"):
        ds_rows = [r for r in rows if r[0] == ds]
        for _, shard, key, off, size in (ds_rows[0], ds_rows[len(ds_rows) // 2], ds_rows[-1]):
            calls.clear()
            s = read_sample(ex.locate(ds, shard, key))
            assert s.key == key and len(calls) <= 2 and calls[0][1:] == (off, off + size)
            whole = next(x for x in read_shard(ex.shard_url(ds, shard)) if x.key == key)
            assert s.members == whole.members and s.error == whole.error  # the same sample as a full scan reads


def test_gzipped_shard_has_no_offsets_and_is_scanned(tmp_path):
    import gzip

    synthesize(str(tmp_path / "c"), noisy_config(seed=3, pairs=8, docs=0, videos=0))
    src = list_shards(str(tmp_path / "c" / "coyo_synth"))[0]
    gz = str(tmp_path / "g" / "coyo_synth" / "00000.tar.gz")
    os.makedirs(os.path.dirname(gz))
    with open(src, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    samples = list(read_shard(gz))
    assert samples and all(s.tar_offset is None and s.tar_size is None for s in samples)
    plain = list(read_shard(src))
    assert all(p.tar_offset is not None for p in plain)


def test_query_is_checked_and_sandboxed_and_pages_are_bounded(explored):
    from curation.app.explore.data import PAGE, QueryError

    ex = explored["ex"]
    cards, total = ex.query("caption_words < 4 AND dataset = 'coyo_synth'", 0, "caption_words")
    n = ex.con.cursor().execute("SELECT count(*) FROM scores WHERE caption_words < 4 AND dataset = 'coyo_synth'").fetchone()[0]
    assert total == n > 0 and len(cards) == min(PAGE, n) and all(c["value"] < 4 for c in cards)
    for bad in ("1; DROP TABLE scores", "key IN (SELECT key FROM basic)", "read_text('/etc/passwd') IS NOT NULL"):
        with pytest.raises(QueryError):
            ex.query(bad, 0)
    # the expression ran on the explorer's own locked connection, over the score files in place (no
    # table was copied into it), and that connection reaches no other file and cannot be unlocked
    assert ex.con.cursor().execute("SELECT count(*) FROM duckdb_tables()").fetchone()[0] == 0
    for stmt in ("SELECT * FROM read_text('/etc/passwd')", "SET enable_external_access = true", "INSTALL httpfs"):
        with pytest.raises(duckdb.Error):
            ex.con.cursor().execute(stmt)
    # the store is unchanged: the explorer wrote its decisions to its cache, not under the work folder
    assert not os.path.exists(os.path.join(explored["work"], "selection"))


def test_overview_histogram_and_rule_page_agree_with_the_joined_view(explored):
    """Counted once at startup and read from one scorer's files, they equal the same questions
    asked of the joined view of every score and decision."""
    ex = explored["ex"]
    con = ex.con.cursor()
    for r in ex.overview():
        assert (r["scored"], r["kept"]) == con.execute(
            "SELECT count(*), count(*) FILTER (WHERE dropped_by IS NULL) FROM explore WHERE dataset = ?",
            [r["dataset"]]).fetchone()
        h = ex.histogram(r["dataset"], "caption_words")
        lo, hi, n = con.execute("SELECT min(caption_words), max(caption_words), count(caption_words) FROM explore "
                                "WHERE dataset = ?", [r["dataset"]]).fetchone()
        assert (h["lo"], h["hi"], sum(h["bins"])) == (lo, hi, n)
    label = "threshold:caption_words>=8"
    cards, total, col = ex.rule_page("coyo_synth", label, 0, True)
    want = con.execute("SELECT key, caption_words FROM explore WHERE dataset = 'coyo_synth' AND dropped_by = ? "
                       "ORDER BY caption_words DESC, shard, key", [label]).fetchall()
    assert col == "caption_words" and total == len(want) > 0 and [(c["key"], c["value"]) for c in cards] == want[:48]


def _tree(folder: str) -> dict[str, tuple[int, int]]:
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(explored):
    import uvicorn

    from curation.app.explore.web import create_app

    port = _port()
    srv = uvicorn.Server(uvicorn.Config(create_app(explored["ex"]), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


def test_browser_overview_rule_sample_query_and_404(explored, server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium on PATH (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    shots = os.environ.get("EXPLORE_SCREENSHOTS") or str(tmp_path / "screens")
    os.makedirs(shots, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 900})
            pg.goto(server + "/")
            assert "coyo_synth" in pg.content() and pg.locator("svg.hist line").count() >= 1  # threshold drawn
            pg.screenshot(path=f"{shots}/overview.png", full_page=True)
            pg.locator("a.rule", has_text="threshold").first.click()
            pg.wait_for_load_state("networkidle")
            assert "dropped by threshold" in pg.inner_text("h2")
            imgs = pg.locator("img.thumb")
            assert imgs.count() > 0
            pg.wait_for_function("Array.from(document.images).every(i => i.complete)")
            widths = pg.eval_on_selector_all("img.thumb", "els => els.map(e => e.naturalWidth)")
            assert widths and all(w > 0 for w in widths)
            pg.screenshot(path=f"{shots}/rule.png", full_page=True)
            pg.locator(".card a").first.click()
            pg.wait_for_load_state("networkidle")
            assert "dropped by threshold" in pg.inner_text("#decision")
            assert "\ncaption_words\t" in pg.locator("#scores").inner_text() and pg.inner_text(".caption").strip()
            assert pg.eval_on_selector("#image", "e => e.naturalWidth") > 0
            pg.screenshot(path=f"{shots}/sample.png", full_page=True)
            pg.fill("input[name=where]", "caption_words < 2")
            pg.click("header button")
            pg.wait_for_load_state("networkidle")
            assert "query" in pg.inner_text("h2") and pg.locator(".card").count() > 0
            pg.screenshot(path=f"{shots}/query.png", full_page=True)
            resp = pg.goto(server + "/sample?dataset=coyo_synth&shard=00000&key=%3Cscript%3Enope")
            assert resp.status == 404 and "<script>nope" in pg.inner_text("#message")
            assert "Traceback" not in pg.content()
            pg.screenshot(path=f"{shots}/404.png", full_page=True)
            assert pg.request.get(server + "/thumb?dataset=coyo_synth&shard=nope&key=1").status == 404
            _documents_videos_deciles(pg, server, explored["ex"], shots)
        finally:
            browser.close()


def _documents_videos_deciles(pg, server: str, ex: Explorer, shots: str) -> None:
    """A document shows its images next to its sentences; a clip shows frames; a score shows deciles."""
    cur = ex.con.cursor()
    doc = cur.execute("SELECT shard, key FROM explore WHERE dataset = 'mmc4_synth' AND basic_error IS NULL "
                      "AND num_images > 0 LIMIT 1").fetchone()
    pg.goto(f"{server}/sample?dataset=mmc4_synth&shard={doc[0]}&key={doc[1]}")
    pg.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = pg.eval_on_selector_all("#doc img", "els => els.map(e => e.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    pg.screenshot(path=f"{shots}/document.png", full_page=True)
    clip = cur.execute("SELECT shard, key FROM explore WHERE dataset = 'video_synth' AND basic_error IS NULL "
                       "LIMIT 1").fetchone()
    pg.goto(f"{server}/sample?dataset=video_synth&shard={clip[0]}&key={clip[1]}")
    pg.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = pg.eval_on_selector_all("img.frame", "els => els.map(e => e.naturalWidth)")
    assert len(widths) >= 2 and all(w > 0 for w in widths)
    pg.screenshot(path=f"{shots}/video.png", full_page=True)
    pg.goto(f"{server}/score?dataset=coyo_synth&col=caption_words")
    assert pg.locator("h3").count() == 10 and pg.locator(".card").count() >= 10
    pg.screenshot(path=f"{shots}/score.png", full_page=True)


def test_explorer_writes_nothing_to_the_store(explored, server):
    import urllib.request

    with urllib.request.urlopen(server + "/") as r:
        assert r.status == 200
    assert _tree(explored["work"]) == explored["before"]


def test_curate_explore_command_serves_on_loopback(explored, tmp_path):
    import subprocess
    import sys
    import urllib.request

    port = _port()
    cmd = [sys.executable, "-m", "curation.app.cli", "explore", "--work", explored["work"], "--port", str(port),
           "--cache", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.time() + 60, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert "coyo_synth" in body and "nothing is dropped" in body  # no policy: every sample kept
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "http://127.0.0.1:" in out
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "empty")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no score files" in bad.stderr and "Traceback" not in bad.stderr


def test_compare_two_policies_shows_what_the_second_keeps_that_the_first_drops(explored, tmp_path):
    import yaml

    b = {k: v for k, v in POLICY.items()}
    b["datasets"] = {**POLICY["datasets"], "coyo_synth": POLICY["datasets"]["coyo_synth"][:1]}  # no threshold rule
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(b))
    ex = Explorer(explored["work"], policy=str(explored["root"] / "policy.yaml"), cache=str(tmp_path / "c"),
                  compare=str(tmp_path / "b.yaml"))
    threshold = dict(next(r for r in ex.overview() if r["dataset"] == "coyo_synth")["dropped"])["threshold:caption_words>=8"]
    assert ex.compare_counts()["coyo_synth"] == (threshold, 0)
    cards, total = ex.compare_page("coyo_synth", 0)
    assert total == threshold and {c["dropped_by"] for c in cards} == {"threshold:caption_words>=8"}


def test_a_sample_on_s3_is_one_ranged_get(explored, s3_bucket, monkeypatch):
    """Against a real S3 endpoint (moto's server on loopback): every S3 call is counted."""
    import s3fs

    ex = explored["ex"]
    shard, key, off, size = ex.con.cursor().execute(
        "SELECT shard, key, tar_offset, tar_size FROM basic WHERE dataset = 'coyo_synth' ORDER BY key DESC LIMIT 1").fetchone()
    url = f"{s3_bucket}/coyo_synth/{shard}.tar"
    fs, path = storage.get_fs(url)
    fs.put_file(ex.shard_url("coyo_synth", shard), path)
    calls: list[tuple[str, dict]] = []
    real = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *a, **kw):
        calls.append((getattr(method, "__name__", method), kw))
        return await real(self, method, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    s = read_sample(Location("coyo_synth", shard, key, url, off, size))
    assert s.key == key and s.error is None and s.image
    assert len(calls) <= 2 and [kw.get("Range") for m, kw in calls if m == "get_object"] == [f"bytes={off}-{off + size - 1}"]


def test_a_manifest_gives_its_policy_decisions_and_stage_mixture(explored, tmp_path):
    from fastapi.testclient import TestClient

    from curation.app.explore.web import create_app
    from curation.selection.curate import curate

    work = str(tmp_path / "work")
    shutil.copytree(explored["work"], work)  # curate writes its decisions under the work folder
    _, url = curate(work, str(explored["root"] / "policy.yaml"), str(tmp_path / "out"), use_ray=False)
    ex = Explorer(work, manifest=url, cache=str(tmp_path / "c"))
    assert ex.has_decisions and ex.overview() == explored["ex"].overview()
    # --policy reuses the decisions `curate select` wrote for this policy and these score files ...
    policy = str(explored["root"] / "policy.yaml")
    again = Explorer(work, policy=policy, cache=str(tmp_path / "c2"))
    assert again.reused == ex.manifest["decisions"] and not os.path.exists(tmp_path / "c2")
    assert again.overview() == ex.overview()
    # ... and not once a score file changed since (it selects again, into its cache)
    f = next(p for p in _tree(os.path.join(work, "scores", "basic")) if p.endswith("00000.parquet"))
    os.utime(f, ns=(time.time_ns(), time.time_ns()))
    fresh = Explorer(work, policy=policy, cache=str(tmp_path / "c3"))
    assert fresh.reused is None and os.listdir(tmp_path / "c3") and fresh.overview() == ex.overview()
    assert ex.thresholds("coyo_synth", "caption_words") == explored["ex"].thresholds("coyo_synth", "caption_words") != []
    page = TestClient(create_app(ex)).get("/").text
    assert "Stage mixture" in page and "align" in page
