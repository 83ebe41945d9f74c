"""Training from curated manifests: stage plan, data mixing, Ray Train, resume, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import yaml

from conftest import noisy_config
from curation.selection.curate import curate
from curation.scoring.engine import ScorerSpec, ShardTask, score_local
from curation.data.shards import dataset_of, list_shards
from curation.corpus.synth import synthesize
from training_hooks.bootstrap import init_tiny_model
from model.examples import interleave
from training_hooks.data import DataSplit, mix, stage_sources, stream_samples
from training_hooks.kickoff import TrainingInputError, train_from_manifest
from training_hooks.recipe import TrainRecipeError
from training_hooks.ray_train import run_stage_on_ray
from training_hooks.trainer import run_stage

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
    """`curate train` on Ray Train: the plan, then the five stages in one worker group, each from the
    previous one's final checkpoint and each changing only the modules it trains."""
    out = tmp_path / "run"
    recipe = _recipe(setup, out, ray={"enabled": True, "num_workers": 1})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    r = subprocess.run([sys.executable, "-m", "curation.app.cli", "train", "--manifest", setup["manifest_url"],
                        "--recipe", str(tmp_path / "recipe.yaml")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "align" in r.stdout and "trains projector" in r.stdout  # the plan is printed first
    report = json.loads((out / "training_report.json").read_text())
    # one Ray Train worker group (one run, one worker process) trained the five stages in order,
    # and each stage's progress was reported as it finished
    assert [p.name for p in (out / "ray_results").iterdir()] == ["nvila-align-vision_pretrain-pretrain-image_sft-video_sft"]
    assert len({s["pid"] for s in report["stages"]}) == 1 and all(s["world_size"] == 1 for s in report["stages"])
    done = [r.stdout.index(f"stage {st}: 4 steps, loss") for st in ("align", "vision_pretrain", "pretrain", "image_sft", "video_sft")]
    assert done == sorted(done)
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


def _stage_cfg(setup, tmp_path, stage_dir, **plan):
    from training_hooks.recipe import load_train_recipe, plan_stages

    stage = {"image_sft": dict(plan)}
    plans, _ = plan_stages(load_train_recipe(_recipe(setup, tmp_path / "unused", stages=stage)), setup["manifest"])
    return {"plan": plans[0].model_dump(), "stage_dir": str(stage_dir), "init_dir": setup["init"],
            "manifest": setup["manifest_url"], "seed": 0}


def test_two_workers_follow_one_worker_with_twice_the_batch(setup, tmp_path):
    """DDP on 2 Ray Train workers (gloo, CPU), batch 2 each, against one in-process worker with batch 4.

    The ranks split one sample stream, so their batches of a step hold the single worker's batch;
    the loss is normalized by the step's label tokens over both ranks. Stated tolerance: losses
    agree to 1e-4 relative and weights to 1e-4 absolute, 5 % of one Adam step at lr 2e-3 (float
    sums in another order: padding to another length, gradients all-reduced over gloo; Adam
    turns such differences on near-zero gradients into visible ones)."""
    steps = dict(steps=5, lr=2e-3, save_every=3, warmup_steps=1)
    one = run_stage(_stage_cfg(setup, tmp_path, tmp_path / "one", batch_size=4, **steps))
    two = run_stage_on_ray(_stage_cfg(setup, tmp_path, tmp_path / "two", batch_size=2, **steps), num_workers=2)
    assert two["world_size"] == 2 and two["device"] == "cpu"
    a, b = [x["loss"] for x in one["metrics"]], [x["loss"] for x in two["metrics"]]
    assert a[-1] < a[0]  # it trains
    assert b == pytest.approx(a, rel=1e-4)
    assert two["heldout_loss"]["pair"] == pytest.approx(one["heldout_loss"]["pair"], rel=1e-4)
    wa, wb = _weights(one["final"]), _weights(two["final"])
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4) for k in wa)
    # rank 0 alone wrote the checkpoints, with both ranks' stream positions
    ckpt = json.loads((tmp_path / "two" / "checkpoints" / "step-000005" / "state.json").read_text())
    assert ckpt["positions"] == [19, 20]  # rank r took samples r, r + 2, ..., 2 per step: 20 samples in 5 steps


def _progress(out, stages) -> int:
    """Steps checkpointed so far over the stages, read from the run's directory."""
    done = 0
    for name, steps in stages:
        d = out / name
        if (d / "metrics.json").exists():
            done += steps
            continue
        ck = sorted((d / "checkpoints").glob("step-[0-9]*[0-9]")) if (d / "checkpoints").exists() else []
        return done + (int(ck[-1].name.split("-")[1]) if ck else 0)
    return done


def test_train_resumes_after_real_kills(setup, tmp_path):
    """`curate train` is killed with SIGKILL at 3 seeded random points (a seeded delay after a
    seeded number of checkpointed steps: mid-step, mid-checkpoint or mid-stage-end), rerun each
    time, and finishes with the loss curve, held-out loss and weights of an uninterrupted run."""
    stages = [("align", 6), ("image_sft", 6)]
    recipe = _recipe(setup, tmp_path / "x", defaults={"batch_size": 4, "max_length": 256, "save_every": 2, "heldout_samples": 8},
                     stages={n: {"steps": k} for n, k in stages})

    def cmd(out):
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump(dict(recipe, output=str(out))))
        return [sys.executable, "-m", "curation.app.cli", "train", "--manifest", setup["manifest_url"],
                "--recipe", str(tmp_path / f"{out.name}.yaml")]

    full = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    rng = random.Random(14)
    targets = sorted(rng.sample(range(1, sum(k for _, k in stages) - 1), 3))
    out, kills = tmp_path / "killed", []
    for target in targets:
        proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and _progress(out, stages) < target:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        kills.append((target, proc.wait(), _progress(out, stages)))
    assert [rc for _, rc, _ in kills] == [-signal.SIGKILL] * 3, kills  # each run died mid-training
    last = subprocess.run(cmd(out), capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    for name, _ in stages:
        ref = json.loads((tmp_path / "full" / name / "metrics.json").read_text())
        got = json.loads((out / name / "metrics.json").read_text())
        assert [x["loss"] for x in got["metrics"]] == pytest.approx([x["loss"] for x in ref["metrics"]], rel=1e-5)
        assert got["heldout_loss"] == pytest.approx(ref["heldout_loss"], rel=1e-5)
        wa, wb = _weights(str(tmp_path / "full" / name / "final")), _weights(str(out / name / "final"))
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), name


def test_checkpoint_state_is_never_unpickled(setup, tmp_path):
    """A checkpoint in a shared directory cannot run code: a state.pt holding a pickled callable
    is refused on resume, and the callable never runs."""
    cfg = _stage_cfg(setup, tmp_path, tmp_path / "s", steps=2, save_every=1, batch_size=2)
    run_stage(cfg)
    ck = tmp_path / "s" / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Evil(), "rng": {}}, ck / "state.pt")
    import shutil

    shutil.rmtree(tmp_path / "s" / "final")
    (tmp_path / "s" / "metrics.json").unlink()
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        run_stage(cfg)
    assert not marker.exists()


def test_gpu_asked_for_without_one_is_refused(setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TrainingInputError, match="use_gpu is true but this machine has no CUDA GPU"):
        train_from_manifest(setup["manifest_url"], _recipe(setup, tmp_path / "g", ray={"enabled": False, "use_gpu": True},
                                                          stages={"align": {"steps": 1}}))


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


def _training_samples(m, plan):
    """Samples of each dataset a stage really trains on per pass, counted by reading the shards."""
    return {s.name: sum(1 for _ in stream_samples(s, 0, DataSplit(), heldout=False, loop=False))
            for s in stage_sources(m, {ds: 1.0 for ds in plan.datasets}, plan.heldout_every, plan.heldout_samples)}


def test_epochs_become_steps_from_the_manifest_counts(setup, tmp_path):
    """A budget in epochs is a number of passes over the stage's curated mixture as the manifest
    counts it (weights included, held-out slice excluded); ``steps`` overrides it."""
    from training_hooks.kickoff import stage_steps
    from training_hooks.recipe import load_train_recipe, plan_stages

    m = setup["manifest"]
    recipe = load_train_recipe(_recipe(setup, tmp_path / "o", defaults={"batch_size": 4, "epochs": 3, "heldout_samples": 8},
                                       stages={"align": {}, "pretrain": {"epochs": 2}, "image_sft": {"steps": 7}}))
    plans = {p.name: p for p in plan_stages(recipe, m)[0]}
    steps = {n: stage_steps(m, p, recipe.ray) for n, p in plans.items()}
    read = _training_samples(m, plans["pretrain"])
    align_samples = 3 * read["coyo_synth"]  # defaults: 3 epochs of coyo (weight 1)
    pretrain_samples = 2 * (read["mmc4_synth"] + 3 * read["coyo_synth"])  # mmc4 x1 + coyo x3, twice
    assert abs(steps["align"] * 4 - align_samples) <= 0.1 * align_samples + 4, (steps, read)
    assert abs(steps["pretrain"] * 4 - pretrain_samples) <= 0.1 * pretrain_samples + 4, (steps, read)
    assert steps["image_sft"] == 7  # steps: an override
    # the trainer runs what the plan says and reads that many samples
    rep = train_from_manifest(setup["manifest_url"], _recipe(setup, tmp_path / "run", defaults={
        "batch_size": 16, "max_length": 256, "heldout_samples": 8}, stages={"align": {"epochs": 1}}), info=lambda _: None)
    align = rep["stages"][0]
    assert align["epochs"] == 1 and abs(align["steps"] * 16 - read["coyo_synth"]) < 16, (align["steps"], read)
    from training_hooks.checkpoint import latest_checkpoint

    state = json.loads(open(os.path.join(latest_checkpoint(str(tmp_path / "run" / "align")), "state.json")).read())
    assert state["step"] == align["steps"] and state["positions"] == [align["steps"] * 16]  # samples drawn


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


# --------------------------------------------------------------------------- curate eval


def test_caption_parser_reads_every_synthetic_template(setup):
    """The true captions of the clean pairs, judged against the ground truth: every colour, shape
    and background right, and the position right wherever a template states it."""
    from curation.corpus.synth import load_ground_truth
    from training_hooks.evaluate import ATTRIBUTES, caption_scores, judge, parse_caption

    truth = {(r["dataset"], r["key"]): r for r in load_ground_truth(str(setup["root"] / "corpus")).iter_rows(named=True)}
    judged = []
    for url in list_shards(str(setup["root"] / "corpus" / "coyo_synth")):
        from curation.data.shards import read_shard

        for s in read_shard(url):
            t = truth[(s.dataset, s.key)]
            if t["noise"] == "clean":
                d = json.loads(t["detail"])
                judged.append(judge(parse_caption(s.caption), {a: d[a] for a in ATTRIBUTES}))
    scores = caption_scores(judged)
    assert scores["caption_accuracy"] == 1.0 and scores["images"] >= 15
    assert 0.3 < scores["position_stated"] < 0.9  # 3 of the 5 templates state it
    wrong = judge(parse_caption("a blue star on a red background"), {"color": "red", "shape": "star", "pos": "center", "bg": "blue"})
    assert wrong == {"color": False, "shape": True, "bg": False, "pos": None}
    assert judge(parse_caption(""), {"color": "red", "shape": "star", "pos": "center", "bg": "blue"})["shape"] is False


def test_curate_eval_reports_loss_accuracy_and_gallery(setup, tmp_path):
    from typer.testing import CliRunner

    from curation.app.cli import app

    corpus = setup["root"] / "corpus"
    r = CliRunner().invoke(app, ["eval", "--checkpoint", setup["init"], "--shards", str(corpus / "coyo_synth"),
                                 "--limit", "12", "--gallery", "4", "--out", str(tmp_path / "g"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["samples"] == 12 and rep["ground_truth"] and rep["heldout_loss"]["pair"] > 0
    assert rep["images"] == len(rep["captions"]) and 0 < rep["images"] <= 12  # clean images only
    assert set(rep["per_attribute"]) == {"color", "shape", "pos", "bg"}
    # the accuracy is the share of judged attributes right in the captions listed (learning: tests/test_learning.py)
    judged = [c["judged"] for c in rep["captions"]]
    right, counted = (sum(v is True for j in judged for v in j.values()), sum(v is not None for j in judged for v in j.values()))
    assert counted >= 3 * rep["images"] and rep["caption_accuracy"] == round(right / counted, 4)
    assert (tmp_path / "g" / "gallery.png").stat().st_size > 5000
    md = (tmp_path / "g" / "gallery.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| key")]
    assert "![gallery](gallery.png)" in md and len(table) == min(4, rep["images"])
    r = CliRunner().invoke(app, ["eval", "--checkpoint", setup["init"], "--shards", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no such shard or folder" in r.output
