"""``text``: caption language (py3langid) and Gopher/C4-style quality signals, scored with no media
decoded, and used by policies (language, confidence, junk patterns) end to end."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.langid_compare import load_captions
from curation import ScorerSpec, ScoreStore, ShardTask, ShardWriter, list_shards, load_policy, run_selection, score_local
from scorers.text import score_texts

JUNK = {"j0": "IMG_2044.JPG", "j1": "click here to download the free template", "j2": "sale sale sale sale sale",
        "j3": "https://example.com/gallery/photo-123.html", "j4": "DSC00912", "j5": "&&&& 1234 #### ////"}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A pair shard set: the labelled captions of three languages, junk alt texts, one sample with
    a corrupt image (text needs no pixels) and one with no caption."""
    root = tmp_path_factory.mktemp("captions")
    labelled = {f"{lang}{i:02d}": (lang, text) for i, (lang, text) in enumerate(load_captions())
                if lang in ("en", "de", "fr")}
    png = _png()
    with ShardWriter(str(root / "pairs"), max_samples=20) as w:
        for key, (_, text) in labelled.items():
            w.write({"__key__": key, "png": png, "txt": text.encode()})
        for key, text in JUNK.items():
            w.write({"__key__": key, "png": png, "txt": text.encode()})
        w.write({"__key__": "broken_image", "png": b"not a png", "txt": b"A cat sleeping on a red sofa"})
        w.write({"__key__": "no_caption", "png": png})
    work = str(tmp_path_factory.mktemp("work"))
    tasks = [ShardTask(u, "pairs", "pair") for u in list_shards(str(root / "pairs"))]
    report = score_local(tasks, ScorerSpec("text", batch_size=16), work)
    assert not report.failed
    return work, labelled


def test_signals_of_junk_captions():
    rows = dict(zip(JUNK, score_texts(list(JUNK.values()))))
    assert rows["j0"]["is_filename"] and rows["j4"]["is_filename"]
    assert rows["j1"]["boilerplate"] and not rows["j1"]["is_filename"]
    assert rows["j2"]["repeated_words"] == pytest.approx(0.8) and rows["j2"]["top_bigram_ratio"] == 1.0
    assert rows["j3"]["has_url"]
    assert rows["j5"]["alpha_ratio"] < 0.3
    clean = score_texts(["A brown dog running on the beach at sunset"])[0]
    assert clean["lang"] == "en" and clean["lang_score"] > 0.9 and clean["stopwords"] >= 2
    assert not (clean["is_filename"] or clean["boilerplate"] or clean["has_url"]) and clean["alpha_ratio"] == 1.0


def test_languages_and_errors_in_the_store(captioned):
    work, labelled = captioned
    rows = {r["key"]: r for r in ScoreStore(work).query_arrow("SELECT * FROM text").to_pylist()}
    assert len(rows) == len(labelled) + len(JUNK) + 2  # every sample once
    right = sum(rows[k]["lang"] == lang for k, (lang, _) in labelled.items())
    assert right / len(labelled) >= 0.9
    assert rows["broken_image"]["error"] is None and rows["broken_image"]["lang"] == "en"  # no pixels needed
    assert "no text to score" in rows["no_caption"]["error"] and rows["no_caption"]["lang"] is None
    files = [f for f in __import__("glob").glob(f"{work}/scores/text/**/*.parquet", recursive=True) if "/_" not in f]
    md = pq.read_metadata(files[0]).metadata
    assert b"py3langid" in md[b"curation.identity"]


def test_policy_keeps_confident_english_without_junk(captioned):
    """The issue's policy: a lang_score threshold with ``lang = 'en'``, plus the junk patterns."""
    work, labelled = captioned
    policy = load_policy({"defaults": [
        {"rule": "threshold", "column": "lang_score", "min": 0.8},
        {"rule": "sql", "keep_where": "lang = 'en'"},
        {"rule": "sql", "name": "junk", "keep_where": "NOT is_filename AND NOT boilerplate AND NOT has_url"},
    ]})
    result = run_selection(ScoreStore(work), policy)
    decisions = pq.read_table(result.decisions_url).to_pylist()
    kept = {d["key"] for d in decisions if d["dropped_by"] is None}
    english = {k for k, (lang, _) in labelled.items() if lang == "en"}
    assert kept <= english | {"broken_image"}  # nothing in German, French or junk is kept
    assert len(kept & english) >= 0.75 * len(english)
    reasons = {d["key"]: d["dropped_by"] for d in decisions}
    assert reasons["j1"] == "junk" or reasons["j1"].startswith("threshold")
    assert reasons["no_caption"] == "scorer_error:text"
    assert all(reasons[k] is not None for k, (lang, _) in labelled.items() if lang != "en")


def _readme_block(marker: str) -> str:
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(re.escape(marker) + r"\s*```yaml\n(.*?)```", text, re.S)
    assert m, f"README has no yaml block after {marker}"
    return m.group(1)


def _tiny_clip(tmp_path) -> str:
    """A tiny OpenCLIP built from its config and saved in the layout a user's checkpoint has."""
    import open_clip
    import torch

    from scorers.clip import register_configs, save_open_clip_dir

    register_configs()
    torch.manual_seed(0)
    out = str(tmp_path / "tiny-clip")
    save_open_clip_dir(open_clip.create_model("tiny-clip"), open_clip.get_model_config("tiny-clip"), out, {"size": 64})
    return out


def test_readme_coyo_recipe_and_policy_run(tmp_path):
    """The README's COYO-style recipe and policy, on a COYO-style shard: scored by basic, meta and
    text, then selected; every kept sample is confident English, no junk, safe and aesthetic."""
    import yaml

    from benchmarks.bench_filters import make_coyo_shard
    from curation import ScoringPlan

    shard = make_coyo_shard(str(tmp_path / "coyo"), "00000", 40, real_images=True, seed=4)
    recipe = yaml.safe_load(_readme_block("<!-- coyo-recipe -->"))
    recipe["work"], recipe["sources"][0]["shards"] = str(tmp_path / "work"), shard
    clip = next(s for s in recipe["scorers"] if s["name"] == "clip")
    clip["params"] = {**clip["params"], "model": _tiny_clip(tmp_path), "pretrained": None}  # no weights to fetch here
    plan = ScoringPlan.resolve(recipe)
    for spec in plan.specs:  # in this process: the Ray path is the plugin test's
        assert not score_local(list(plan.tasks), spec, plan.work).failed
    store = ScoreStore(plan.work)
    result = run_selection(store, load_policy(yaml.safe_load(_readme_block("<!-- coyo-policy -->"))))
    decisions = pq.read_table(result.decisions_url).to_pylist()
    assert len(decisions) == store.count("meta") == store.count("text") == store.count("basic")
    kept = [d["key"] for d in decisions if d["dropped_by"] is None]
    assert kept, {d["dropped_by"] for d in decisions}
    rows = {r["key"]: r for r in store.query_arrow("SELECT * FROM scores").to_pylist()}
    for k in kept:
        r = rows[k]
        assert r["lang"] == "en" and r["lang_score"] >= 0.8 and not r["is_filename"] and not r["boilerplate"]
        assert r["nsfw_opennsfw2"] < 0.5 and r["watermark"] < 0.5 and r["aesthetic"] >= 4.5
    assert {d["dropped_by"] for d in decisions} >= {"english", "threshold:lang_score>=0.8", "alt_text_junk"}
