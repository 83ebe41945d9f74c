"""Training teaches: a tiny NVILA, trained briefly on clean synthetic pairs through the user's path
(synthesize, score, curate a manifest, ``train_from_manifest``, ``evaluate_checkpoint``), captions
fresh images better than its initial weights and better than any caption that ignores the image."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from curation.corpus.synth import DatasetSpec, SynthConfig, load_ground_truth, synthesize
from curation.data.shards import list_shards
from curation.scoring.engine import ScorerSpec, ShardTask, score_local
from curation.selection.curate import curate
from training_hooks.bootstrap import init_tiny_model
from training_hooks.evaluate import ATTRIBUTES, evaluate_checkpoint
from training_hooks.kickoff import train_from_manifest

STEPS = 150  # image_sft steps of 16 pairs: ~20 CPU seconds on one thread


def blind_accuracy(truth_rows: list[dict], judged: list[dict]) -> float:
    """Caption accuracy of the best caption that ignores the image: for each attribute the value most
    frequent among these very images (an upper bound on any image-blind captioner here), scored on
    the attributes the model's captions were judged on."""
    import json

    details = [json.loads(r["detail"]) for r in truth_rows]
    majority = {a: Counter(d[a] for d in details).most_common(1)[0][1] / len(details) for a in ATTRIBUTES}
    counted = Counter(a for j in judged for a, v in j.items() if v is not None)
    return sum(majority[a] * n for a, n in counted.items()) / sum(counted.values())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    synthesize(str(root / "corpus"), SynthConfig(seed=5, datasets=[DatasetSpec("pairs", "pair", 400, {}, 400)]))
    synthesize(str(root / "heldout"), SynthConfig(seed=6, datasets=[DatasetSpec("heldout", "pair", 60, {}, 60)]))
    tasks = [ShardTask(u, "pairs") for u in list_shards(str(root / "corpus" / "pairs"))]
    assert not score_local(tasks, ScorerSpec("basic"), str(root / "work")).failed
    policy = {"defaults": [], "datasets": {}, "stages": {"image_sft": {"pairs": 1.0}}}
    manifest, url = curate(str(root / "work"), policy, str(root / "curated"), use_ray=False)
    init = init_tiny_model(manifest, str(root / "init"), image_mode="resize", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic, so the same figures, on any machine's core count
    try:
        rep = train_from_manifest(url, {
            "init": init, "output": str(root / "run"), "ray": {"enabled": False}, "seed": 0,
            "defaults": {"batch_size": 16, "max_length": 256, "heldout_samples": 4, "warmup_steps": 5},
            "stages": {"image_sft": {"steps": STEPS, "lr": 3e-3}}})
        evals = {name: evaluate_checkpoint(ck, str(root / "heldout" / "heldout"), out_dir=str(root / f"eval-{name}"),
                                           limit=60, gallery=4)
                 for name, ck in (("init", init), ("trained", rep["final_checkpoint"]))}
    finally:
        torch.set_num_threads(threads)
    return root, rep, evals


def test_trained_model_beats_its_initial_weights_and_chance(trained):
    root, rep, evals = trained
    init, after = evals["init"], evals["trained"]
    assert rep["stages"][0]["steps"] == STEPS and after["images"] == init["images"] == 60
    assert after["heldout_loss"]["pair"] < init["heldout_loss"]["pair"] / 3
    truth = load_ground_truth(str(root / "heldout")).to_dicts()
    chance = blind_accuracy(truth, [r["judged"] for r in after["rows"]])
    assert 0.1 < chance < 0.3
    # the margin is in caption attributes: 0.1 is 4-8 points above what any image-blind caption gets
    assert after["caption_accuracy"] >= init["caption_accuracy"] + 0.1
    assert after["caption_accuracy"] >= chance + 0.1, (after["caption_accuracy"], chance, after["per_attribute"])
    # it reads the image: the background colour, most of the picture, is named far above chance
    assert after["per_attribute"]["bg"] >= 0.5


def test_reported_accuracy_is_the_share_of_judged_attributes_right(trained):
    """The figure the report prints is recomputed here from the captions themselves."""
    _, _, evals = trained
    for ev in evals.values():
        judged = [r["judged"] for r in ev["rows"]]
        right = sum(v is True for j in judged for v in j.values())
        counted = sum(v is not None for j in judged for v in j.values())
        assert ev["caption_accuracy"] == round(right / counted, 4)
        assert ev["all_right"] == round(sum(all(v is not False for v in j.values()) for j in judged) / len(judged), 4)
