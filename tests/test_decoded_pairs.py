"""Pairs read and decoded once ahead of the vision tower's pretraining (training_hooks/decoded_pairs.py):
the same samples, skips and pixels as reading the shards, so the same tower, bit for bit."""

import os
import torch

from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from model import NVILAForCausalLM
from model.nvila import load_tokenizer
from training_hooks import decoded_pairs
from training_hooks.bootstrap import synthesize_pretrain_pairs
from training_hooks.vision_pretrain import REPORT, _decoded_pairs, load_pairs, pretrain_vision
from training_hooks.vision_words import image_view

from tests.test_vision_pretrain import _model


def test_decoded_pairs_train_the_same_tower_as_the_shards(tmp_path):
    # a corrupt image and empty captions among them: skipped for the same reasons either way
    synthesize(str(tmp_path / "pairs"), SynthConfig(seed=12, datasets=[
        DatasetSpec("p", "pair", 120, {"corrupt_image": 0.05, "empty_caption": 0.05}, 60)]))
    shards = str(tmp_path / "pairs" / "p")
    texts = ["a red circle on blue", "a green square on white", "a small yellow star"]
    m = _model(tmp_path / "m", texts)
    tok = load_tokenizer(str(tmp_path / "m"))
    assert decoded_pairs.load(shards, 32) is None  # nothing decoded yet: the pretraining reads the shards
    read = load_pairs(shards, m, tok, image_view)
    decoded_pairs.write(shards, 32)
    ahead = _decoded_pairs(decoded_pairs.load(shards, 32), tok)
    assert read[1] == ahead[1] and read[2] == ahead[2] and read[2]["no_caption"] > 0
    assert torch.equal(torch.stack(read[0]), torch.stack(ahead[0]))

    reports, towers = {}, {}
    for name in ("read", "decoded"):
        _model(tmp_path / name, texts)
        if name == "read":
            os.remove(decoded_pairs.path_for(shards, 32))
        else:
            decoded_pairs.write(shards, 32)
        reports[name] = pretrain_vision(str(tmp_path / name), shards, steps=4, batch_size=16, heldout=16)
        towers[name] = NVILAForCausalLM.from_pretrained(str(tmp_path / name)).vision_tower.state_dict()
    assert reports["read"]["skipped"] == reports["decoded"]["skipped"]
    assert reports["read"]["heldout"] == reports["decoded"]["heldout"]
    assert all(torch.equal(towers["read"][k], towers["decoded"][k]) for k in towers["read"])
    assert os.path.isfile(tmp_path / "decoded" / REPORT)


def test_decoded_pairs_of_other_shards_are_not_used(tmp_path):
    shards = synthesize_pretrain_pairs(str(tmp_path / "pp"), 40, 3, decode_for="demo")
    assert decoded_pairs.fresh(shards, 32)
    assert len(decoded_pairs.load(shards, 32)["views"]) == 40
    assert decoded_pairs.load(shards, 48) is None  # another tile size
    shard = os.path.join(shards, sorted(f for f in os.listdir(shards) if f.endswith(".tar"))[0])
    os.utime(shard, ns=(0, 0))  # a shard written since: the shards are read again
    assert decoded_pairs.load(shards, 32) is None and not decoded_pairs.fresh(shards, 32)
