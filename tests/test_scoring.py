"""The scoring engine on a real local Ray, the scorers, the DuckDB store and recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from curation.data import storage
from curation.scoring.engine import ScorerSpec, ShardTask, read_score_metadata, run_scoring, score_file_url, score_local
from curation.scoring.recipe import RecipeError, check_recipe, load_score_recipe
from curation.data.shards import dataset_of, list_shards, read_shard, shard_name
from curation.scoring.store import ScoreStore
from curation.corpus.synth import load_ground_truth
from scorers import build_scorer
from scorers.clip import ClipScorer, save_open_clip_dir

DATASETS = ("coyo_synth", "mmc4_synth", "video_synth")


@pytest.fixture(scope="module")
def ray_session(s3_endpoint):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny OpenCLIP model built from its config, saved, and loaded back by path like a user's checkpoint."""
    import open_clip
    import torch

    from scorers.clip import register_configs

    register_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    out = str(tmp_path_factory.mktemp("clip") / "tiny")
    save_open_clip_dir(model, open_clip.get_model_config("tiny-clip"), out, {"size": 64})
    return out


def _tasks(out: str) -> list[ShardTask]:
    return [ShardTask(u, dataset_of(u)) for ds in DATASETS for u in list_shards(f"{out}/{ds}")]


def _rows(work: str, scorer: str) -> dict[tuple[str, str, str], dict]:
    store = ScoreStore(work)
    rows = store.query_pl(f"SELECT * FROM {scorer}").to_dicts()
    out = {}
    for r in rows:
        k = (r["dataset"], r["shard"], r["key"])
        assert k not in out, f"duplicate row {k}"
        out[k] = r
    return out


def test_clip_scorer_by_path_all_kinds(noisy_corpus, tiny_clip_dir):
    out, _ = noisy_corpus
    scorer = ClipScorer(tiny_clip_dir, batch_size=16, num_frames=3, keep_embedding=True)
    scorer.setup()
    assert scorer.model_id().startswith("local-dir:") and scorer.weights_checksum()
    for ds in DATASETS:
        samples = list(read_shard(list_shards(f"{out}/{ds}")[0]))
        cols = scorer.score(samples)
        for i, s in enumerate(samples):
            if s.error:
                assert cols["clip_score"][i] is None and cols["error"][i] == s.error
                continue
            assert -1.0 <= cols["clip_score"][i] <= 1.0
            assert cols["clip_min"][i] <= cols["clip_score"][i] + 1e-6
            assert len(cols["clip_image_emb"][i]) == 64
            if s.kind == "interleaved":
                m = np.array(cols["clip_sim_matrix"][i])
                assert m.shape == (len(s.image_info), len(s.text_list))
                assert cols["clip_best_sentence"][i] == m.argmax(1).tolist()
                assert np.allclose(cols["clip_best_score"][i], m.max(1), atol=1e-5)
            if s.kind == "video":
                assert len(cols["clip_frame_scores"][i]) == 3
                assert np.isclose(cols["clip_score"][i], np.mean(cols["clip_frame_scores"][i]), atol=1e-5)


def test_clip_score_is_raw_cosine(tiny_clip_dir, noisy_corpus):
    import io as _io

    import open_clip
    import torch
    from PIL import Image

    out, _ = noisy_corpus
    s = next(x for x in read_shard(list_shards(f"{out}/coyo_synth")[0]) if x.ok)
    scorer = ClipScorer(tiny_clip_dir)
    got = scorer.score([s])["clip_score"][0]
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")
    with torch.no_grad():
        a = model.encode_image(pre(Image.open(_io.BytesIO(s.image)).convert("RGB"))[None])
        b = model.encode_text(tok([s.caption]))
    ref = torch.nn.functional.cosine_similarity(a, b).item()
    assert got == pytest.approx(ref, abs=1e-5)


def test_basic_scorer_facts(noisy_corpus):
    out, _ = noisy_corpus
    gt = {(r["dataset"], r["key"]): r for r in load_ground_truth(out).iter_rows(named=True)}
    samples = [s for u in list_shards(f"{out}/coyo_synth") for s in read_shard(u)]
    cols = build_scorer("basic").score(samples)
    for i, s in enumerate(samples):
        r = gt[(s.dataset, s.key)]
        assert cols["decodable"][i] == (s.error is None)
        if r["noise"] == "exact_duplicate":
            src = samples.index(next(x for x in samples if x.key == r["source_key"]))
            assert cols["sha256"][i] == cols["sha256"][src]
        if r["noise"] == "near_duplicate":
            import imagehash

            src = samples.index(next(x for x in samples if x.key == r["source_key"]))
            assert cols["sha256"][i] != cols["sha256"][src]
            dist = imagehash.hex_to_hash(cols["phash"][i]) - imagehash.hex_to_hash(cols["phash"][src])
            assert dist <= 4  # the policy default; distinct synthetic images are rarely within 6
        if r["noise"] == "extreme_aspect":
            assert cols["aspect_ratio"][i] > 10
        if r["noise"] == "empty_caption":
            assert cols["caption_chars"][i] == 0 and cols["caption_words"][i] == 0


def test_engine_exactly_once_and_skip_on_rerun(noisy_corpus, tiny_clip_dir, tmp_path, ray_session):
    out, _ = noisy_corpus
    tasks = _tasks(out)
    work = str(tmp_path / "work")
    spec = ScorerSpec("clip", {"model": tiny_clip_dir, "num_frames": 2}, batch_size=8, workers=2)
    report = run_scoring(tasks, spec, work)
    assert not report.failed and len(report.scored) == len(tasks)
    rows = _rows(work, "clip")
    gt = load_ground_truth(out)
    assert set(rows) == {(r["dataset"], r["shard"], r["key"]) for r in gt.iter_rows(named=True)}
    for k, r in rows.items():
        assert (r["error"] is None) == (r["clip_score"] is not None)
    # file metadata: scorer identity, config hash, input checksum
    t = tasks[0]
    md = read_score_metadata(score_file_url(work, "clip", t.dataset, shard_name(t.url)))
    assert md["scorer"] == "clip" and md["config_hash"] == report.config_hash
    assert json.loads(md["identity"])["model"].startswith("local-dir:")
    assert md["shard_checksum"]
    # rerun: everything skipped, nothing rewritten
    mtimes = {p: os.path.getmtime(p) for p in storage.list_files(f"{work}/scores/clip/dataset=coyo_synth")}
    again = run_scoring(tasks, spec, work)
    assert len(again.skipped) == len(tasks) and not again.scored
    assert mtimes == {p: os.path.getmtime(p) for p in mtimes}
    # a different config is a different identity: scored again
    spec2 = ScorerSpec("clip", {"model": tiny_clip_dir, "num_frames": 3}, batch_size=8, workers=2)
    assert len(run_scoring(tasks[:1], spec2, work).scored) == 1


def test_changed_shard_is_rescored(tmp_path, ray_session):
    from curation.corpus.synth import SynthConfig, synthesize

    synthesize(str(tmp_path / "c"), SynthConfig.preset("tiny", seed=1))
    url = list_shards(str(tmp_path / "c" / "cc3m_synth"))[0]
    work = str(tmp_path / "w")
    spec = ScorerSpec("basic")
    assert len(score_local([ShardTask(url, "cc3m_synth")], spec, work).scored) == 1
    assert len(score_local([ShardTask(url, "cc3m_synth")], spec, work).skipped) == 1
    synthesize(str(tmp_path / "c"), SynthConfig.preset("tiny", seed=2))  # same names, new bytes
    assert len(score_local([ShardTask(url, "cc3m_synth")], spec, work).scored) == 1


def test_failing_shard_is_retried_then_reported(noisy_corpus, tmp_path, ray_session):
    out, _ = noisy_corpus
    tasks = _tasks(out)[:2]
    missing = ShardTask(str(tmp_path / "gone" / "00000.tar"), "gone", "pair", checksum="x")
    report = run_scoring(tasks + [missing], ScorerSpec("basic", max_retries=1, workers=2), str(tmp_path / "w"))
    assert len(report.scored) == 2
    (failed,) = report.failed
    assert failed.url == missing.url and failed.attempts == 2 and "No such file" in failed.failed



def test_workers_that_never_start_fail_their_shards_instead_of_waiting(noisy_corpus, tmp_path, ray_session, monkeypatch):
    """Workers asking for more CPUs than the cluster has (as when every node that had them is lost)
    are never placed: after the start timeout each shard fails with the reason, none is lost."""
    out, _ = noisy_corpus
    tasks = _tasks(out)[:3]
    monkeypatch.setenv("CURATION_WORKER_START_TIMEOUT", "2")
    report = run_scoring(tasks, ScorerSpec("basic", num_cpus=64, workers=2), str(tmp_path / "w"))
    assert not report.scored and sorted(f.url for f in report.failed) == sorted(t.url for t in tasks)
    assert all("no scoring worker started within 2 s" in f.failed and "num_cpus=64" in f.failed for f in report.failed)

RECIPE = """
work: {work}
ray: {{num_cpus: 2}}
sources:
  - {{shards: {corpus}/coyo_synth, kind: pair}}
  - {{shards: {corpus}/mmc4_synth, kind: interleaved}}
  - {{shards: {corpus}/video_synth, kind: video}}
scorers:
  - {{name: basic, workers: 2, batch_size: 16}}
  - name: clip
    params: {{model: {model}, num_frames: 2}}
    batch_size: 8
    workers: 2
"""


def _run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curation.app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_killed_run_resumes_to_identical_rows(noisy_corpus, tiny_clip_dir, tmp_path):
    out, _ = noisy_corpus
    ref_work, work = str(tmp_path / "ref"), str(tmp_path / "killed")
    for w in (ref_work, work):
        (tmp_path / f"{os.path.basename(w)}.yaml").write_text(RECIPE.format(work=w, corpus=out, model=tiny_clip_dir))
    r = _run_cli("score", "--config", str(tmp_path / "ref.yaml"))
    assert r.returncode == 0, r.stderr
    # start the same job, kill it (whole process group) once some but not all files exist
    proc = subprocess.Popen([sys.executable, "-m", "curation.app.cli", "score", "--config", str(tmp_path / "killed.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    total = len(_tasks(out)) * 2
    deadline = time.time() + 300
    n = 0
    while time.time() < deadline:
        n = sum(len(storage.list_files(d, ".parquet")) for s in ("basic", "clip")
                for d in storage.list_dirs(f"{work}/scores/{s}"))
        if n >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < n < total, f"kill came too late or too early: {n} of {total} files"
    r = _run_cli("score", "--config", str(tmp_path / "killed.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert sum(x["skipped"] for x in summary) >= 3
    for scorer in ("basic", "clip"):
        a, b = _rows(ref_work, scorer), _rows(work, scorer)
        assert set(a) == set(b)
        for k in a:
            ra, rb = dict(a[k]), dict(b[k])
            assert ra == rb, (scorer, k)
    # no temp files left behind under final names
    for scorer in ("basic", "clip"):
        for d in storage.list_dirs(f"{work}/scores/{scorer}"):
            for f in os.listdir(d):
                assert f.endswith(".parquet") or f.startswith("."), f


def test_store_joined_view_and_query_cli(noisy_corpus, tiny_clip_dir, tmp_path):
    out, _ = noisy_corpus
    (tmp_path / "r.yaml").write_text(RECIPE.format(work=tmp_path / "w", corpus=out, model=tiny_clip_dir))
    r = _run_cli("score", "--config", str(tmp_path / "r.yaml"))
    assert r.returncode == 0, r.stderr
    clip_hash = ClipScorer(tiny_clip_dir, num_frames=2).config_hash()
    assert f"clip [{clip_hash}]: " in r.stdout  # the summary line, its hash not eaten as markup
    store = ScoreStore(str(tmp_path / "w"))
    assert set(store.views) == {"basic", "clip"}
    cols = store.columns()
    assert {"dataset", "shard", "key", "kind", "basic_error", "clip_error", "clip_score", "sha256"} <= set(cols)
    n = store.query_pl("SELECT count(*) AS n FROM scores").item()
    assert n == load_ground_truth(out).height == store.count("basic") == store.count("clip")
    per = store.query_pl("SELECT dataset, count(*) n, count(clip_score) scored FROM scores GROUP BY 1 ORDER BY 1")
    assert per["dataset"].to_list() == sorted(DATASETS)
    r = _run_cli("query", "SELECT dataset, count(*) AS n FROM scores GROUP BY 1 ORDER BY 1", "--work", str(tmp_path / "w"),
                 "--csv", str(tmp_path / "q.csv"))
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "q.csv").read_text().splitlines()
    assert lines[0] == "dataset,n" and len(lines) == 4
    r = _run_cli("query", "SELECT nope FROM scores", "--work", str(tmp_path / "w"))
    assert r.returncode == 2 and "query failed" in r.stderr


@pytest.mark.s3
def test_s3_input_and_output(s3_bucket, tiny_clip_dir, ray_session):
    from curation.corpus.synth import SynthConfig, synthesize

    synthesize(f"{s3_bucket}/corpus", SynthConfig.preset("tiny", seed=3))
    tasks = [ShardTask(u, dataset_of(u)) for ds in ("coyo_synth", "video_synth") for u in list_shards(f"{s3_bucket}/corpus/{ds}")]
    work = f"{s3_bucket}/work"
    report = run_scoring(tasks, ScorerSpec("clip", {"model": tiny_clip_dir}, batch_size=16, workers=2), work)
    assert not report.failed and len(report.scored) == len(tasks)
    assert all(t.checksum is None for t in tasks)
    assert len(run_scoring(tasks, ScorerSpec("clip", {"model": tiny_clip_dir}, batch_size=16, workers=2), work).skipped) == len(tasks)
    store = ScoreStore(work)
    n = store.query_pl("SELECT count(*) FROM clip").item()
    gt = load_ground_truth(f"{s3_bucket}/corpus")
    assert n == gt.filter(gt["dataset"].is_in(["coyo_synth", "video_synth"])).height


def test_bad_recipes_fail_before_work(tmp_path, noisy_corpus, tiny_clip_dir):
    out, _ = noisy_corpus
    base = yaml.safe_load(RECIPE.format(work=tmp_path / "w", corpus=out, model=tiny_clip_dir))

    def bad(mutate, match):
        data = json.loads(json.dumps(base))
        mutate(data)
        with pytest.raises(RecipeError, match=match):
            check_recipe(load_score_recipe(data))

    bad(lambda d: d["scorers"].append({"name": "nonsense"}), r"scorers\[2\]\.name: .*unknown scorer 'nonsense'")
    bad(lambda d: d["scorers"][1]["params"].update(model=str(tmp_path / "no-model")), r"scorers\[1\]\.params \(clip\)")
    bad(lambda d: d["sources"][0].update(shards=str(tmp_path / "nowhere")), r"sources\[0\]\.shards: no such shard")
    bad(lambda d: d["sources"][0].update(kind="audio"), r"sources\[0\]\.kind")
    bad(lambda d: d["scorers"][0].update(batch_size=0), r"scorers\[0\]\.batch_size")
    bad(lambda d: d.update(colour="blue"), r"colour")
    bad(lambda d: d["scorers"][1]["params"].update(model="ViT-B-32", pretrained="missing.pt"), r"weights file not found")
    bad(lambda d: d["scorers"][1]["params"].update(model="ViT-B-32", pretrained="no_such_tag"), r"unknown pretrained tag")
    bad(lambda d: d["scorers"][1]["params"].update(threshold="high"), r"scorers\[1\]\.params \(clip\): threshold must be a number")
    r = _run_cli("score", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "scoring recipe not found" in r.stderr
    assert not (tmp_path / "w").exists()


def test_two_sources_with_one_identity_are_refused(noisy_corpus, tmp_path):
    """Score files are keyed by (dataset, shard name): a second source under the same key is
    refused at planning, naming both, instead of overwriting (or silently reusing) the first's."""
    import shutil

    from curation.scoring.engine import SourceConflictError

    out, _ = noisy_corpus
    src = list_shards(f"{out}/coyo_synth")[0]
    a, b = tmp_path / "a" / "coyo_synth", tmp_path / "b" / "coyo_synth"
    for d in (a, b):
        d.mkdir(parents=True)
        shutil.copy(src, d / "00000.tar")  # the same bytes, even: still another source
    work = str(tmp_path / "w")
    ta, tb = ShardTask(str(a / "00000.tar"), "coyo_synth"), ShardTask(str(b / "00000.tar"), "coyo_synth")
    assert len(score_local([ta], ScorerSpec("basic"), work).scored) == 1
    scored = score_file_url(work, "basic", "coyo_synth", "00000")
    before = (os.path.getmtime(scored), read_score_metadata(scored))
    for tasks in ([tb], [ta, tb]):
        with pytest.raises(SourceConflictError, match=f"coyo_synth/00000 is both {a}/00000.tar and {b}/00000.tar"):
            score_local(tasks, ScorerSpec("basic"), work)
    assert (os.path.getmtime(scored), read_score_metadata(scored)) == before
    # two sources of one run, through the CLI: refused before any work (recipe planning)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"work: {tmp_path / 'w2'}\nsources:\n  - {{shards: {a}}}\n  - {{shards: {b}}}\n"
                      f"scorers:\n  - {{name: basic}}\n")
    r = _run_cli("score", "--config", str(recipe))
    assert r.returncode == 2 and str(a / "00000.tar") in r.stderr and str(b / "00000.tar") in r.stderr, r.stderr
    assert not (tmp_path / "w2").exists()


def test_damaged_shard_keeps_rows_before_the_damage(tmp_path, ray_session):
    """A malformed PAX header (it used to hang the actor) and an empty shard, scored on Ray."""
    from tarfuzz import SHARDS, replace_pax

    pax = next(s for s in SHARDS if s.label == "pax")
    victim = next(m for m in pax.members if m.name == "0001.txt")
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "00000.tar").write_bytes(replace_pax(pax.data, victim, b"0 a=b\n"))
    (tmp_path / "web" / "00001.tar").write_bytes(b"")
    tasks = [ShardTask(u, "web") for u in list_shards(str(tmp_path / "web"))]
    report = run_scoring(tasks, ScorerSpec("basic", max_retries=2), str(tmp_path / "w"))
    (ok,) = report.scored
    (failed,) = report.failed
    assert ok.rows == 2 and ok.errors == 1
    assert failed.url.endswith("00001.tar") and "empty shard" in failed.failed and failed.attempts == 1  # no retry
    rows = _rows(str(tmp_path / "w"), "basic")
    assert rows[("web", "00000", "0000")]["error"] is None
    assert "'0001.txt'" in rows[("web", "00000", "0001")]["error"] and "length 0" in rows[("web", "00000", "0001")]["error"]


def test_dfn_filter_separates_mismatched_captions(tmp_path):
    """DFN: a tiny CLIP trained on clean pairs only ranks held-out clean pairs above injected mismatches."""
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize

    trusted = SynthConfig(seed=21, datasets=[DatasetSpec("trusted", "pair", 600, {}, 300)])
    heldout = SynthConfig(seed=22, datasets=[DatasetSpec("heldout", "pair", 200, {"mismatched_caption": 0.2, "noise_image": 0.05}, 100)])
    synthesize(str(tmp_path / "t"), trusted)
    synthesize(str(tmp_path / "h"), heldout)
    model_dir = str(tmp_path / "dfn")
    r = _run_cli("train-filter", "--trusted", str(tmp_path / "t" / "trusted"), "--out", model_dir, "--steps", "80",
                 "--batch-size", "64", "--eval", str(tmp_path / "h" / "heldout"),
                 "--ground-truth", str(tmp_path / "h" / "ground_truth.parquet"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "dfn" / "train_report.json").read_text())
    assert report["eval"]["roc_auc"] >= 0.9, report["eval"]
    assert report["losses"][-1] < report["losses"][0]
    # the saved filter loads by path in the scorer, like any user checkpoint
    assert ClipScorer(model_dir).model_id() == f"local-dir:{os.path.abspath(model_dir)}"
