"""Pretraining of the vision tower (training_hooks/vision_pretrain.py) on real shards: caption-word
classification (the default) and SigLIP's sigmoid loss."""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from curation.app.cli import app
from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from model import NVILAConfig, NVILAForCausalLM
from model.tokenizer import train_bpe_tokenizer
from training_hooks.vision_pretrain import REPORT, caption_neighbours, describe, neighbourhood_batch, pretrain_vision, sigmoid_loss
from training_hooks.vision_words import frequency_precision, word_precision


def _model(path, texts):
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    cfg = NVILAConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=32, patch_size=8),
                      llm_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=len(tok), tie_word_embeddings=True),
                      s2_scales=[32, 64], max_tiles=4)
    torch.manual_seed(0)
    m = NVILAForCausalLM(cfg)
    m.attach_tokenizer(tok)
    m.save_pretrained(str(path), tok)
    return m


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp")
    # clean pairs, plus a set with a corrupt image and an empty caption among them
    synthesize(str(root / "clean"), SynthConfig(seed=11, datasets=[DatasetSpec("p", "pair", 320, {}, 160)]))
    synthesize(str(root / "noisy"), SynthConfig(seed=12, datasets=[
        DatasetSpec("p", "pair", 200, {"corrupt_image": 0.05, "empty_caption": 0.05}, 100)]))
    return root


def test_sigmoid_loss_prefers_matching_pairs():
    good = torch.eye(4) * 20 - 10
    assert sigmoid_loss(good) < sigmoid_loss(-good)


def test_batches_are_caption_neighbourhoods():
    import random

    # captions 0-9 share tokens {1, 2, 3} plus one of their own; 10-19 share {7, 8, 9}
    ids = [[1, 2, 3, 20 + i] for i in range(10)] + [[7, 8, 9, 40 + i] for i in range(10)]
    near = caption_neighbours(ids, 64, k=5)
    assert all(set(near[i]) <= set(range(10)) - {i} for i in range(10))
    assert all(set(near[i]) <= set(range(10, 20)) - {i} for i in range(10, 20))
    train = list(range(20))
    rng = random.Random(0)
    for _ in range(20):  # one anchor and three of its neighbours: all from one neighbourhood
        batch = neighbourhood_batch(rng, train, dict(enumerate(near)), 4, group=4)
        assert len(set(batch)) == 4 and len({j // 10 for j in batch}) == 1
    batch = neighbourhood_batch(rng, train, dict(enumerate(near)), 16, group=4)
    assert len(set(batch)) == 16


def test_word_precision_counts_the_captions_tokens_ranked_first():
    ids = [[3, 5], [1, 2, 4]]
    perfect = torch.zeros(2, 8)
    perfect[0, [3, 5]] = 1.0
    perfect[1, [1, 2, 4]] = 1.0
    assert word_precision(perfect, ids) == 1.0
    assert word_precision(-perfect, ids) == 0.0
    half = torch.zeros(2, 8)
    half[0, [3, 6]] = 1.0  # one of two right
    half[1, [1, 6, 7]] = 1.0  # one of three right
    assert abs(word_precision(half, ids) - (0.5 + 1 / 3) / 2) < 1e-9
    # the words-alone guess ranks tokens by how many training captions hold them
    assert frequency_precision([[1, 2], [1, 3], [1, 2]], [[1, 2]], 8) == 1.0


def _changed(a, b):
    return any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_word_pretraining_makes_the_image_tell_the_words(pairs, tmp_path):
    from curation.data.shards import read_shard

    texts = [s.caption for s in read_shard(str(pairs / "clean" / "p" / "00000.tar"))]
    before = _model(tmp_path / "m", texts)
    report = pretrain_vision(str(tmp_path / "m"), str(pairs / "clean" / "p"), steps=150, batch_size=64, heldout=64)
    b, a = report["heldout"]["before"], report["heldout"]["after"]
    # held-out pairs it never trained on: the image tells words the word frequencies alone do not
    assert a["heldout_word_precision"] >= a["words_alone"] + 0.05 and a["heldout_word_precision"] > b["heldout_word_precision"]
    assert report["objective"] == "words" and report["pairs"] == 320 and report["train_pairs"] == 256
    assert report["skipped"] == {} and json.loads((tmp_path / "m" / REPORT).read_text())["steps"] == 150
    assert "held-out caption's tokens" in describe(report)
    after = NVILAForCausalLM.from_pretrained(str(tmp_path / "m"))
    # only the tower trains (the first stage trains the projector, as in NVILA)
    assert _changed(before.vision_tower, after.vision_tower)
    assert not _changed(before.projector, after.projector) and not _changed(before.llm, after.llm)


def test_sigmoid_pretraining_learns_to_match_images_and_captions(pairs, tmp_path):
    from curation.data.shards import read_shard

    texts = [s.caption for s in read_shard(str(pairs / "clean" / "p" / "00000.tar"))]
    before = _model(tmp_path / "m", texts)
    report = pretrain_vision(str(tmp_path / "m"), str(pairs / "clean" / "p"), objective="sigmoid", steps=120,
                             batch_size=64, heldout=64)
    b, a = report["heldout"]["before"], report["heldout"]["after"]
    # held-out pairs it never trained on: well above chance, and above the untrained tower
    assert a["heldout_retrieval_top1"] >= 4 * a["chance"] and a["heldout_retrieval_top1"] > b["heldout_retrieval_top1"]
    assert report["pairs"] == 320 and report["train_pairs"] == 256 and report["skipped"] == {}
    assert "top-1 among 64 pairs" in describe(report)
    after = NVILAForCausalLM.from_pretrained(str(tmp_path / "m"))
    # the vision tower and projector changed in the saved directory; the LLM did not
    assert _changed(before.vision_tower, after.vision_tower) and _changed(before.projector, after.projector)
    assert not _changed(before.llm, after.llm)


@pytest.mark.parametrize("objective", ["words", "sigmoid"])
def test_bad_samples_are_counted_and_skipped(pairs, tmp_path, objective):
    from curation.data.shards import read_shard

    texts = [s.caption or "" for s in read_shard(str(pairs / "noisy" / "p" / "00000.tar"))]
    _model(tmp_path / "m", texts)
    report = pretrain_vision(str(tmp_path / "m"), str(pairs / "noisy" / "p"), objective=objective, steps=2, batch_size=16)
    skipped = report["skipped"]
    assert skipped.get("unreadable", 0) >= 1 and skipped.get("no_caption", 0) >= 1
    assert report["pairs"] + sum(skipped.values()) == 200  # every sample accounted for


def test_cli_names_what_is_missing(pairs, tmp_path):
    _model(tmp_path / "m", ["a red circle"] * 10)
    r = CliRunner().invoke(app, ["pretrain-vision", "--model", str(tmp_path / "m"), "--pairs", str(tmp_path / "nothing")])
    assert r.exit_code != 0 and "no such shard or folder" in r.output
    r = CliRunner().invoke(app, ["pretrain-vision", "--model", str(tmp_path / "m"), "--pairs", str(pairs / "clean" / "p"),
                                 "--batch-size", "1000", "--steps", "1"])
    assert r.exit_code != 0 and "at least 1000 usable training pairs" in r.output
    r = CliRunner().invoke(app, ["pretrain-vision", "--model", str(tmp_path / "m"), "--pairs", str(pairs / "clean" / "p"),
                                 "--objective", "clip"])
    assert r.exit_code != 0 and "unknown vision pretraining objective 'clip'; expected one of words, sigmoid" in r.output
    assert not os.path.exists(tmp_path / "m" / REPORT)



def test_tower_stops_at_its_feature_layer_with_the_same_features(tmp_path):
    """The tower runs only the layers up to its feature layer: exactly SigLIP's own hidden state there."""
    m = _model(tmp_path / "m", ["a red circle", "a blue square"])
    tiles = torch.randn(5, 3, 32, 32)
    for train in (False, True):
        m.train(train)
        full = m.vision_tower.model(pixel_values=tiles, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(m.vision_tower(tiles), full.view(5, 4, 4, -1))


def test_two_data_parallel_workers_train_as_one_with_the_whole_batch(pairs, tmp_path):
    from curation.data.shards import read_shard

    texts = [s.caption for s in read_shard(str(pairs / "clean" / "p" / "00000.tar"))]
    reports, towers = {}, {}
    for workers in (1, 2):
        _model(tmp_path / f"m{workers}", texts)
        reports[workers] = pretrain_vision(str(tmp_path / f"m{workers}"), str(pairs / "clean" / "p"), steps=12,
                                           batch_size=32, heldout=64, workers=workers)
        towers[workers] = NVILAForCausalLM.from_pretrained(str(tmp_path / f"m{workers}")).vision_tower
    assert reports[2]["workers"] == 2 and reports[1]["workers"] == 1
    # the same batches and steps, each split between the ranks: the same curve and weights up to float order
    one, two = [c["loss"] for c in reports[1]["curve"]], [c["loss"] for c in reports[2]["curve"]]
    assert len(one) == len(two) and all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(one, two))
    assert _changed(towers[1].model.encoder.layers[0], _model(tmp_path / "fresh", texts).vision_tower.model.encoder.layers[0])
    for (name, a), b in zip(towers[1].named_parameters(), towers[2].parameters()):
        # the key bias shifts every logit of a query alike, so softmax gives it a gradient of float
        # noise only, which AdamW scales up to full steps: it follows the float order, nothing else
        if not name.endswith("k_proj.bias"):
            assert torch.allclose(a, b, atol=1e-5), name
