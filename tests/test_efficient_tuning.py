"""NVILA's efficient fine-tuning as stage options: LayerNorm-only tower, LoRA on the LLM (peft),
merged into plain checkpoints; trainable-parameter counts, learning, resume, loading without peft."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from model import NVILAForCausalLM
from vila_fixture import corpus_tokenizer, make_vila_dir, small_manifest
from training_hooks.recipe import TrainRecipeError, load_train_recipe, plan_stages
from training_hooks.trainer import heldout_losses, run_stage

LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]}  # all but down_proj


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("eff")
    manifest, url, corpus = small_manifest(str(root))
    # one tile per image (resize): the stage is about the LLM and the tower's norms, not the tiling
    init = make_vila_dir(str(root / "nvila_vila"), corpus_tokenizer(manifest), projector="mlp_downsample_3x3_fix",
                         aspect="resize")
    return {"root": root, "manifest": manifest, "url": url, "init": init}


def _cfg(setup, stage_dir, **stage):
    recipe = {"init": setup["init"], "output": str(setup["root"] / "unused"), "ray": {"enabled": False},
              "defaults": {"batch_size": 4, "max_length": 512, "heldout_samples": 8, "warmup_steps": 1},
              "stages": {"image_sft": stage}}
    plans, _ = plan_stages(load_train_recipe(recipe), setup["manifest"])
    return {"plan": plans[0].model_dump(), "stage_dir": str(stage_dir), "init_dir": setup["init"],
            "manifest": setup["url"], "seed": 0, "threads": 1}  # one thread: the machine is shared


def _expected_counts(m: NVILAForCausalLM, lora: dict) -> dict[str, int]:
    """LoRA: r * (in + out) per adapted linear; the tower's LayerNorms: 2 * width each."""
    c = m.llm.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = {"q_proj": (c.hidden_size, c.hidden_size), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
              "o_proj": (c.hidden_size, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
              "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    llm = c.num_hidden_layers * sum(lora["r"] * sum(shapes[t]) for t in lora["targets"])
    v = m.vision_tower.model.config
    # two per layer, the post-layernorm, and the pooling head's when the tower has the head
    tower = 2 * v.hidden_size * (2 * v.num_hidden_layers + 1 + int(getattr(v, "vision_use_head", True)))
    return {"vision_tower": tower, "projector": sum(p.numel() for p in m.projector.parameters()), "llm": llm}


def test_lora_and_layernorm_stage_learns_and_merges_into_a_plain_checkpoint(setup, tmp_path, monkeypatch):
    cfg = _cfg(setup, tmp_path / "s", steps=12, lr=1e-2, vision_tune="layernorm", lora=LORA, save_every=6)
    init = NVILAForCausalLM.from_pretrained(setup["init"])
    from model.nvila import load_tokenizer
    from training_hooks.recipe import StagePlan

    before = heldout_losses(init, load_tokenizer(setup["init"]), setup["manifest"], StagePlan(**cfg["plan"]), 0)
    res = run_stage(cfg)
    assert res["trainable_params"] == _expected_counts(init, LORA) and res["lora_merged"]
    # seeded: 6.39 -> 6.06 when measured (a full-parameter stage: 4.90)
    assert res["heldout_loss"]["pair"] < before["pair"] - 0.15, (before, res["heldout_loss"])
    assert res["metrics"][-1]["loss"] < res["metrics"][0]["loss"]
    # the merged checkpoint: plain names, the tower's frozen weights untouched, the LLM's adapted ones moved
    final = NVILAForCausalLM.from_pretrained(res["final"])
    sd, sd0 = final.state_dict(), init.state_dict()
    assert set(sd) == set(sd0)
    assert torch.equal(sd["vision_tower.model.encoder.layers.0.mlp.fc1.weight"],
                       sd0["vision_tower.model.encoder.layers.0.mlp.fc1.weight"])
    assert not torch.equal(sd["vision_tower.model.encoder.layers.0.layer_norm1.weight"],
                           sd0["vision_tower.model.encoder.layers.0.layer_norm1.weight"])
    assert not torch.equal(sd["llm.model.layers.0.self_attn.q_proj.weight"], sd0["llm.model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(sd["llm.model.layers.0.mlp.down_proj.weight"], sd0["llm.model.layers.0.mlp.down_proj.weight"])
    # it loads where peft cannot be imported (every peft module blocked: `import peft` raises ImportError)
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")] + ["peft"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import peft  # noqa: F401
    plain = NVILAForCausalLM.from_pretrained(res["final"])
    assert not any("lora" in k for k in plain.state_dict())


def test_lora_stage_resumes_on_the_same_curve(setup, tmp_path):
    whole = run_stage(_cfg(setup, tmp_path / "whole", steps=6, lr=3e-3, lora=LORA, save_every=3))
    part_dir = tmp_path / "part"
    run_stage(_cfg(setup, part_dir, steps=6, lr=3e-3, lora=LORA, save_every=3))
    # as if killed after step 3: only that checkpoint is left
    shutil.rmtree(part_dir / "final")
    os.remove(part_dir / "metrics.json")
    shutil.rmtree(part_dir / "checkpoints" / "step-000006")
    resumed = run_stage(_cfg(setup, part_dir, steps=6, lr=3e-3, lora=LORA, save_every=3))
    assert resumed["resumed_from"] == 3
    assert [m["loss"] for m in resumed["metrics"]] == pytest.approx([m["loss"] for m in whole["metrics"]], abs=1e-4)
    a, b = NVILAForCausalLM.from_pretrained(whole["final"]), NVILAForCausalLM.from_pretrained(resumed["final"])
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-5), k


def test_bad_efficient_options_are_refused(setup, tmp_path):
    with pytest.raises(TrainRecipeError, match="lora adapts the LLM"):
        _cfg(setup, tmp_path / "x", steps=1, train=["projector"], lora=LORA)
    with pytest.raises(TrainRecipeError, match="vision_tune: layernorm"):
        _cfg(setup, tmp_path / "x", steps=1, train=["projector", "llm"], vision_tune="layernorm")
    with pytest.raises(TrainRecipeError, match="r"):
        _cfg(setup, tmp_path / "x", steps=1, lora={"r": 0})
    with pytest.raises(ValueError, match="not linear layers"):
        run_stage(_cfg(setup, tmp_path / "y", steps=1, lora={"r": 2, "targets": ["qkv"]}))


def test_curate_train_and_eval_run_on_a_vila_directory(setup, tmp_path):
    """`curate train` starts from a VILA-layout init (a LoRA + LayerNorm stage among them) and
    `curate eval` reads a VILA-layout checkpoint."""
    import json

    import yaml
    from typer.testing import CliRunner

    from curation.app.cli import app

    recipe = {"init": setup["init"], "output": str(tmp_path / "out"), "ray": {"enabled": False},
              "defaults": {"batch_size": 4, "max_length": 512, "heldout_samples": 4, "save_every": 10},
              "stages": {"align": {"steps": 2}, "image_sft": {"steps": 2, "vision_tune": "layernorm", "lora": {"r": 2}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(app, ["train", "--manifest", setup["url"], "--recipe", str(tmp_path / "r.yaml")])
    assert r.exit_code == 0, r.output
    rep = json.load(open(tmp_path / "out" / "training_report.json"))
    assert [s["stage"] for s in rep["stages"]] == ["align", "image_sft"]
    assert NVILAForCausalLM.from_pretrained(rep["final_checkpoint"]).config.projector_type == "mlp_downsample_3x3"
    corpus = setup["root"] / "corpus" / "coyo_synth"
    r = CliRunner().invoke(app, ["eval", "--checkpoint", setup["init"], "--shards", str(corpus), "--limit", "6",
                                 "--gallery", "2", "--out", str(tmp_path / "g"), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["samples"] == 6 and ev["heldout_loss"]["pair"] > 0
