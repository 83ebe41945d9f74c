"""Training from curated manifests: stage plan, data mixing, Ray Train, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import yaml

from conftest import noisy_config
from curation.curate import curate
from curation.engine import ScorerSpec, ShardTask, score_local
from curation.shards import dataset_of, list_shards
from curation.synth import synthesize
from training_hooks.bootstrap import init_tiny_model
from model.examples import interleave
from training_hooks.data import DataSplit, mix, stage_sources, stream_samples
from training_hooks.kickoff import TrainingInputError, train_from_manifest
from training_hooks.recipe import TrainRecipeError
from training_hooks.trainer import StageInterrupted, run_stage

POLICY = {
    "defaults": [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 1}],
    "datasets": {"coyo_synth": [{"rule": "dedup"}], "mmc4_synth": [{"rule": "dedup"}], "video_synth": [{"rule": "dedup"}]},
    "stages": {
        "align": {"coyo_synth": 1.0},
        "vision_pretrain": {"coyo_synth": 1.0},
        "pretrain": {"mmc4_synth": 1.0, "coyo_synth": 3.0},
        "image_sft": {"coyo_synth": 1.0},
        "video_sft": {"video_synth": 1.0, "coyo_synth": 0.5},
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    corpus, work = str(root / "corpus"), str(root / "work")
    synthesize(corpus, noisy_config(seed=3, pairs=80, docs=16, videos=14))
    tasks = [ShardTask(u, dataset_of(u)) for ds in ("coyo_synth", "mmc4_synth", "video_synth") for u in list_shards(f"{corpus}/{ds}")]
    assert not score_local(tasks, ScorerSpec("basic"), work).failed
    manifest, url = curate(work, POLICY, str(root / "curated"), use_ray=False)
    init = init_tiny_model(manifest, str(root / "init"))
    return {"root": root, "manifest": manifest, "manifest_url": url, "init": init}


def _recipe(setup, out, **kw):
    r = {"init": setup["init"], "output": str(out), "ray": {"enabled": False},
         "defaults": {"batch_size": 4, "max_length": 256, "save_every": 3, "heldout_samples": 8},
         "stages": {s: {"steps": 4} for s in ("align", "vision_pretrain", "pretrain", "image_sft", "video_sft")}}
    r.update(kw)
    return r


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _group(name: str) -> str:
    return name.split(".")[0]


def test_five_stages_on_ray_train_each_changing_only_its_modules(setup, tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(setup, out, ray={"enabled": True, "num_workers": 1})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    r = subprocess.run([sys.executable, "-m", "curation.cli", "train", "--manifest", setup["manifest_url"],
                        "--recipe", str(tmp_path / "recipe.yaml")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "align" in r.stdout and "trains projector" in r.stdout  # the plan is printed first
    report = json.loads((out / "training_report.json").read_text())
    assert report["manifest_id"] == setup["manifest"].id
    assert [s["stage"] for s in report["stages"]] == ["align", "vision_pretrain", "pretrain", "image_sft", "video_sft"]
    expected = {"align": {"projector"}, "vision_pretrain": {"vision_tower", "projector"}, "pretrain": {"projector", "llm"},
                "image_sft": {"vision_tower", "projector", "llm"}, "video_sft": {"vision_tower", "projector", "llm"}}
    prev = _weights(setup["init"])
    for st in report["stages"]:
        cur = _weights(st["final"])  # each stage starts from the previous one's final checkpoint
        changed = {_group(k) for k in cur if not torch.equal(cur[k], prev[k])}
        assert changed == expected[st["stage"]], (st["stage"], changed)
        metrics = json.loads((out / st["stage"] / "metrics.json").read_text())
        assert len(metrics["metrics"]) == 4 and {"loss", "lr", "tokens_per_s"} <= set(metrics["metrics"][0])
        assert metrics["heldout_loss"]
        prev = cur
    kinds = json.loads((out / "video_sft" / "metrics.json").read_text())["heldout_loss"]
    assert set(kinds) == {"video", "pair"}
    assert (out / "loss.png").stat().st_size > 1000


def test_checkpoint_of_one_stage_loads_as_next_start(setup, tmp_path):
    from model import NVILAForCausalLM

    rep = train_from_manifest(setup["manifest_url"], _recipe(setup, tmp_path / "o", stages={"align": {"steps": 3}, "pretrain": {"steps": 3}}),
                              info=lambda t: None)
    align_final = NVILAForCausalLM.from_pretrained(rep["stages"][0]["final"])
    pre = _weights(rep["stages"][1]["final"])
    # pretrain does not train the vision tower: it must still be exactly align's
    for k, v in align_final.state_dict().items():
        if k.startswith("vision_tower."):
            assert torch.equal(v, pre[k])


def test_resume_after_killed_stage_continues_the_loss_curve(setup, tmp_path):
    m = setup["manifest"]
    from training_hooks.recipe import load_train_recipe, plan_stages

    plans, _ = plan_stages(load_train_recipe(_recipe(setup, tmp_path / "x", stages={"pretrain": {"steps": 9}})), m)

    def cfg(stage_dir, stop=None):
        return {"plan": plans[0].model_dump(), "stage_dir": str(stage_dir), "init_dir": setup["init"],
                "manifest": setup["manifest_url"], "seed": 0, "_stop_after": stop}

    full = run_stage(cfg(tmp_path / "full"))
    with pytest.raises(StageInterrupted):
        run_stage(cfg(tmp_path / "killed", stop=6))  # killed right after the step-6 checkpoint
    resumed = run_stage(cfg(tmp_path / "killed"))
    assert resumed["resumed_from"] == 6
    assert [x["loss"] for x in resumed["metrics"]] == pytest.approx([x["loss"] for x in full["metrics"]], rel=1e-4)
    a, b = _weights(full["final"]), _weights(resumed["final"])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_mixing_weights_hold_over_a_long_stream(setup):
    m = setup["manifest"]
    sources = stage_sources(m, {"mmc4_synth": 1.0, "coyo_synth": 3.0})
    streams = {s.name: stream_samples(s, 0, DataSplit(), shuffle_buffer=8) for s in sources}
    counts = Counter()
    for i, (name, _s) in enumerate(mix(streams, {s.name: s.weight for s in sources}, 0)):
        counts[name] += 1
        if i + 1 == 1500:
            break
    assert abs(counts["coyo_synth"] / 1500 - 0.75) < 0.03, counts


def test_ranks_and_workers_split_the_data(setup):
    m = setup["manifest"]
    src = stage_sources(m, {"coyo_synth": 1.0})[0]
    everything = [s.key for s in stream_samples(src, 0, DataSplit(), loop=False)]
    parts = [[s.key for s in stream_samples(src, 0, DataSplit(rank=r, world_size=2, worker=w, num_workers=2), loop=False)]
             for r in range(2) for w in range(2)]
    assert sorted(k for p in parts for k in p) == sorted(everything)
    assert all(p for p in parts)
    # the same seed gives the same order; another seed another
    again = [s.key for s in stream_samples(src, 0, DataSplit(), loop=False)]
    other = [s.key for s in stream_samples(src, 1, DataSplit(), loop=False)]
    assert everything == again != other


def test_mmc4_document_becomes_interleaved_text():
    text, names = interleave(["intro.", "a red circle.", "a blue star."],
                             [{"image_name": "b.jpg", "matched_text_index": 2}, {"image_name": "a.jpg", "matched_text_index": 1}])
    assert text == "intro. <image> a red circle. <image> a blue star."
    assert names == ["a.jpg", "b.jpg"]


def test_bad_training_inputs_fail_before_training(setup, tmp_path):
    url = setup["manifest_url"]
    with pytest.raises(TrainRecipeError, match=r"stages: .*unknown stage\(s\) \['warmup'\]"):
        train_from_manifest(url, _recipe(setup, tmp_path / "a", stages={"warmup": {"steps": 1}}))
    with pytest.raises(TrainRecipeError, match=r"stages\.align\.train: .*unknown module\(s\) \['decoder'\]"):
        train_from_manifest(url, _recipe(setup, tmp_path / "a", stages={"align": {"train": ["decoder"]}}))
    with pytest.raises(TrainRecipeError, match="not an NVILA checkpoint"):
        train_from_manifest(url, _recipe(setup, tmp_path / "a", init=str(tmp_path / "nothing")))
    with pytest.raises(TrainingInputError, match="max_length 20 cannot fit any sample"):
        train_from_manifest(url, _recipe(setup, tmp_path / "a", defaults={"max_length": 20}, stages={"align": {"steps": 1}}))
    assert not (tmp_path / "a").exists()
    # a curated shard that changed or vanished
    import shutil

    copy = tmp_path / "curated"
    shutil.copytree(os.path.dirname(url), copy)
    shard = setup["manifest"].outputs["coyo_synth"].shards[0].url
    data = bytearray(open(shard, "rb").read())
    data[600] ^= 1
    m = setup["manifest"].model_copy(deep=True)
    moved = str(copy / "coyo_synth" / os.path.basename(shard))
    open(moved, "wb").write(bytes(data))
    for st in m.outputs.values():
        for s in st.shards:
            s.url = str(copy / os.path.relpath(s.url, os.path.dirname(url)))
    m = m.with_id()
    (copy / "manifest.json").write_text(m.to_json())
    with pytest.raises(TrainingInputError, match=f"shard {moved} has md5"):
        train_from_manifest(str(copy / "manifest.json"), _recipe(setup, tmp_path / "b", stages={"align": {"steps": 1}}))
    os.remove(moved)
    with pytest.raises(TrainingInputError, match="is missing"):
        train_from_manifest(str(copy / "manifest.json"), _recipe(setup, tmp_path / "b", stages={"align": {"steps": 1}}))


def test_stage_without_data_is_skipped_with_a_message(setup, tmp_path):
    m = setup["manifest"].model_copy(deep=True)
    m.stages = [s for s in m.stages if s.stage != "video_sft"]
    m = m.with_id()
    path = tmp_path / "manifest.json"
    path.write_text(m.to_json())
    msgs = []
    rep = train_from_manifest(str(path), _recipe(setup, tmp_path / "o", stages={"align": {"steps": 2}, "video_sft": {"steps": 2}}),
                              info=msgs.append)
    assert [s["stage"] for s in rep["stages"]] == ["align"]
    assert any("stage video_sft: the manifest has no curated data for it; skipped" in x for x in msgs)
