"""DeltaLoss: the arithmetic, the ranking it implies, exactly-once rows on the engine, proxies, bad input."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from curation.scoring.engine import ScorerSpec, ShardTask, score_local
from curation.data.samples import PairSample
from curation.data.shards import dataset_of, list_shards, read_shard
from curation.scoring.store import ScoreStore
from curation.corpus.synth import DatasetSpec, Scene, SynthConfig, encode_image, render_scene, synthesize
from model import NVILAConfig, NVILAForCausalLM
from model.conversation import collate
from model.examples import ExampleBuilder
from model.tokenizer import train_bpe_tokenizer
from scorers.deltaloss import DeltaLossScorer

A = "a purple star on a yellow background"
B = "a red circle on a blue background"


def _pair(key: str, caption: str, seed: int = 0) -> PairSample:
    img = encode_image(render_scene(Scene("circle", "red", "blue", "center"), 48, 48, np.random.default_rng(seed)), "png")
    return PairSample(dataset="d", shard="s", key=key, image=img, image_ext="png", caption=caption, width=48, height=48)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """small: trained on B only; large: trained on A and B (both from the same init, same size)."""
    root = tmp_path_factory.mktemp("dl")
    tok = train_bpe_tokenizer([A, B, "Describe the image."] * 10, vocab_size=300)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    lc = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = NVILAForCausalLM(NVILAConfig(vision_config=vc, llm_config=lc, image_mode="resize"))
    base.attach_tokenizer(tok)

    def trained(captions, steps=60):
        m = copy.deepcopy(base)
        b = ExampleBuilder(m, tok, 512)
        batch = collate([b(_pair(f"k{i}", c, i)) for i, c in enumerate(captions)], tok.pad_token_id)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = m(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m

    paths = {}
    for name, caps in (("small", [B]), ("large", [A, B])):
        paths[name] = str(root / name)
        trained(caps).save_pretrained(paths[name], tok)
    paths["tok"] = tok
    return paths


def test_delta_is_small_loss_minus_large_loss_by_hand(models):
    sc = DeltaLossScorer(models["small"], models["large"], batch_size=3)
    samples = [_pair("x", A, 1), _pair("y", B, 2), _pair("z", "a green square", 3)]
    cols = sc.score(samples)
    for i, s in enumerate(samples):
        ref = []
        for path in (models["small"], models["large"]):
            m = NVILAForCausalLM.from_pretrained(path).eval()
            from model.nvila import load_tokenizer

            tok = load_tokenizer(path)
            ex = ExampleBuilder(m, tok, 512)(s)
            with torch.no_grad():
                ref.append(m(**collate([ex], tok.pad_token_id)).loss.item())  # HF mean over answer tokens
        assert cols["loss_small"][i] == pytest.approx(ref[0], rel=1e-4)
        assert cols["loss_large"][i] == pytest.approx(ref[1], rel=1e-4)
        assert cols["delta_loss"][i] == pytest.approx(ref[0] - ref[1], rel=1e-4, abs=1e-5)
        assert cols["answer_tokens"][i] == sum(1 for l in ExampleBuilder(sc.small.model, sc.small.tokenizer, 512)(s).labels if l != -100)


def test_helpful_sample_ranks_above_one_both_models_fit(models):
    sc = DeltaLossScorer(models["small"], models["large"])
    cols = sc.score([_pair("a", A, 5), _pair("b", B, 6)])
    assert cols["delta_loss"][0] > 0.5  # large fits A, small does not
    assert abs(cols["delta_loss"][1]) < cols["delta_loss"][0] / 3  # both fit B
    assert cols["delta_loss"][0] > cols["delta_loss"][1]


def test_no_answer_tokens_and_unreadable_samples_get_errors(models):
    sc = DeltaLossScorer(models["small"], models["large"])
    bad = _pair("e", "", 1)
    broken = _pair("c", A, 2)
    broken.error = "corrupt image: truncated"
    cols = sc.score([bad, broken, _pair("ok", A, 3)])
    assert cols["delta_loss"][:2] == [None, None]
    assert "no_caption" in cols["error"][0] and cols["error"][1] == "corrupt image: truncated"
    assert cols["error"][2] is None and cols["delta_loss"][2] is not None


def test_bad_model_pairs(models, tmp_path, caplog):
    tok2 = train_bpe_tokenizer(["something else entirely"] * 20, vocab_size=280)
    m = NVILAForCausalLM.from_pretrained(models["small"])
    other = NVILAForCausalLM(NVILAConfig(vision_config=m.config.vision_config,
                                         llm_config=dict(m.config.llm_config, vocab_size=len(tok2)), image_mode="resize"))
    other.attach_tokenizer(tok2)
    other.save_pretrained(str(tmp_path / "other"), tok2)
    with pytest.raises(ValueError, match="different tokenizers"):
        DeltaLossScorer(models["small"], str(tmp_path / "other")).setup()
    sep = DeltaLossScorer(models["small"], str(tmp_path / "other"), separate_tokenization=True)
    assert sep.score([_pair("a", A)])["delta_loss"][0] is not None
    with caplog.at_level(logging.WARNING):
        big = NVILAForCausalLM(NVILAConfig(vision_config=m.config.vision_config,
                                           llm_config={**{k: v for k, v in m.config.llm_config.items() if k != "layer_types"},
                                                       "num_hidden_layers": 4}, image_mode="resize"))
        big.attach_tokenizer(models["tok"])
        big.save_pretrained(str(tmp_path / "big"), models["tok"])
        DeltaLossScorer(str(tmp_path / "big"), models["large"]).setup()
    assert "larger than the 'large' one" in caplog.text
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        DeltaLossScorer(str(tmp_path / "nothing"), models["large"])


def test_text_only_causal_lms(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_bpe_tokenizer([A, B] * 10, vocab_size=280)
    for name, layers in (("s", 1), ("l", 2)):
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    sc = DeltaLossScorer(str(tmp_path / "s"), str(tmp_path / "l"))
    cols = sc.score([_pair("a", A), _pair("b", "")])
    assert cols["delta_loss"][0] == pytest.approx(cols["loss_small"][0] - cols["loss_large"][0])
    assert cols["error"][1] == "deltaloss: sample has no text to score"


def test_exactly_once_rows_and_resume_on_the_engine(models, tmp_path):
    synthesize(str(tmp_path / "c"), SynthConfig(seed=1, datasets=[DatasetSpec("d", "pair", 30, {"empty_caption": 0.1,
                                                                                                 "corrupt_image": 0.1}, 10)]))
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(str(tmp_path / "c" / "d"))]
    spec = ScorerSpec("deltaloss", {"small": models["small"], "large": models["large"]}, batch_size=8)
    work = str(tmp_path / "w")
    first = score_local(tasks[:2], spec, work)  # "killed" after two shards
    assert len(first.scored) == 2
    again = score_local(tasks, spec, work)
    assert len(again.skipped) == 2 and len(again.scored) == 1
    rows = ScoreStore(work).query_pl("SELECT key, delta_loss, error FROM deltaloss")
    assert rows.height == 30 and rows["key"].n_unique() == 30
    assert rows.filter(rows["error"].is_not_null()).height == 6


def test_policy_keeps_top_half_by_delta_loss(models, tmp_path):
    from curation.selection.policy import load_policy, run_selection

    synthesize(str(tmp_path / "c"), SynthConfig(seed=2, datasets=[DatasetSpec("d", "pair", 20, {}, 10)]))
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(str(tmp_path / "c" / "d"))]
    work = str(tmp_path / "w")
    score_local(tasks, ScorerSpec("deltaloss", {"small": models["small"], "large": models["large"]}), work)
    res = run_selection(ScoreStore(work), load_policy({"datasets": {"d": [{"rule": "top_k", "column": "delta_loss", "fraction": 0.5}]}}))
    assert res.counts["d"]["kept"] == 10 and res.counts["d"]["dropped"] == {"top_k:delta_loss": 10}


def test_train_proxies_cli_then_score(tmp_path):
    import subprocess
    import sys

    synthesize(str(tmp_path / "t"), SynthConfig(seed=4, datasets=[DatasetSpec("trusted", "pair", 40, {}, 20)]))
    r = subprocess.run([sys.executable, "-m", "curation.app.cli", "train-proxies", "--trusted", str(tmp_path / "t" / "trusted"),
                        "--out", str(tmp_path / "proxies"), "--steps", "4", "--batch-size", "4", "--max-rounds", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    small, large = str(tmp_path / "proxies" / "small"), str(tmp_path / "proxies" / "large")
    ns = sum(p.numel() for p in NVILAForCausalLM.from_pretrained(small).parameters())
    nl = sum(p.numel() for p in NVILAForCausalLM.from_pretrained(large).parameters())
    assert nl > 2 * ns
    # the large proxy trained longer (rounds with early stopping) and is the stronger model on
    # held-out trusted data; the cost of both is recorded
    record = json.loads((tmp_path / "proxies" / "proxies.json").read_text())
    assert record["large"]["steps"] > record["small"]["steps"]
    assert record["large"]["heldout_loss"] < record["small"]["heldout_loss"]
    assert record["large"]["parameters"] == nl and record["small"]["parameters"] == ns
    assert all(record[p]["seconds"] > 0 for p in ("small", "large"))
    sc = DeltaLossScorer(small, large)
    samples = list(read_shard(list_shards(str(tmp_path / "t" / "trusted"))[0]))[:4]
    cols = sc.score(samples)
    assert all(d is not None for d in cols["delta_loss"])


def test_scoring_leaves_global_torch_state_alone(models):
    """A scorer used in a notebook or a trainer's process must not switch autograd off globally."""
    DeltaLossScorer(models["small"], models["large"]).score([_pair("a", A)])
    assert torch.is_grad_enabled()


def test_reference_mode_ranks_what_the_pool_lacks_above_what_it_repeats(models):
    """Reference-model mode (RHO-LOSS): delta = loss under the pool's model - loss under the
    trusted reference. Here the pool's model saw only B (the pool repeats it) and the reference
    saw A and B: A, which the pool lacks, must rank above B."""
    sc = DeltaLossScorer(pool=models["small"], reference=models["large"])
    cols = sc.score([_pair("a", A), _pair("b", B)])
    assert cols["error"] == [None, None]
    assert cols["delta_loss"][0] > cols["delta_loss"][1]
    assert cols["delta_loss"][0] == pytest.approx(cols["loss_small"][0] - cols["loss_large"][0])
    # the mode is part of the scorer's identity: a store never mixes the two modes' scores
    assert sc.config_hash() != DeltaLossScorer(models["small"], models["large"]).config_hash()


def test_deltaloss_refuses_a_mix_of_modes(models):
    with pytest.raises(ValueError, match="either small and large .* or pool and reference"):
        DeltaLossScorer(models["small"], reference=models["large"])
    with pytest.raises(ValueError, match="either small and large"):
        DeltaLossScorer(pool=models["small"])


def test_train_proxies_reference_mode(tmp_path):
    from training_hooks.proxies import train_proxies

    synthesize(str(tmp_path / "t"), SynthConfig(seed=4, datasets=[DatasetSpec("trusted", "pair", 24, {}, 12)]))
    synthesize(str(tmp_path / "p"), SynthConfig(seed=5, datasets=[DatasetSpec("pool", "pair", 24, {"gibberish_caption": 0.25,
                                                                                                 "corrupt_image": 0.1}, 12)]))
    with pytest.raises(ValueError, match="needs the pool"):
        train_proxies(str(tmp_path / "t" / "trusted"), str(tmp_path / "x"), mode="reference")
    with pytest.raises(ValueError, match="only used by the reference-model mode"):
        train_proxies(str(tmp_path / "t" / "trusted"), str(tmp_path / "x"), pool=str(tmp_path / "p" / "pool"))
    res = train_proxies(str(tmp_path / "t" / "trusted"), str(tmp_path / "proxies"), steps=3, batch_size=4,
                        max_rounds=1, mode="reference", pool=str(tmp_path / "p" / "pool"), info=lambda t: None)
    record = json.loads((tmp_path / "proxies" / "proxies.json").read_text())
    assert record["mode"] == "reference" and set(res) == {"pool", "reference"}
    # one architecture and one tokenizer: the two differ only in the data they trained on
    assert record["pool"]["parameters"] == record["reference"]["parameters"]
    assert all(record[m]["seconds"] > 0 and record[m]["steps"] >= 3 for m in ("pool", "reference"))
    sc = DeltaLossScorer(pool=res["pool"]["dir"], reference=res["reference"]["dir"])
    cols = sc.score([s for s in read_shard(list_shards(str(tmp_path / "p" / "pool"))[0]) if s.error is None][:4])
    assert all(d is not None for d in cols["delta_loss"])


def test_precision_option_bf16_autocast_close_to_fp32_with_its_own_hash(models):
    """``precision``: fp32 on a CPU by default (auto), bf16 autocast when asked (on CUDA by default);
    bf16 moves the losses only a little and gets its own config hash; a typo is refused."""
    fp32 = DeltaLossScorer(models["small"], models["large"])
    bf16 = DeltaLossScorer(models["small"], models["large"], precision="bf16")
    assert fp32.precision == "fp32" and DeltaLossScorer(models["small"], models["large"], device="cuda").precision == "bf16"
    assert fp32.config_hash() != bf16.config_hash()
    samples = [_pair("a", A, 5), _pair("b", B, 6)]
    a, b = fp32.score(samples), bf16.score(samples)
    assert a["loss_small"] != b["loss_small"]  # autocast really ran in bf16
    np.testing.assert_allclose(b["delta_loss"], a["delta_loss"], atol=0.1)
    assert b["delta_loss"][0] > b["delta_loss"][1]  # the same ranking
    with pytest.raises(ValueError, match="precision must be one of"):
        DeltaLossScorer(models["small"], models["large"], precision="int8")


def test_train_proxies_large_one_starts_from_a_given_model(tmp_path):
    """``inits``: the large proxy starts from a given model (say, one with a pretrained tower)
    instead of random weights; the fresh small one takes its tokenizer, so their losses compare."""
    from curation.selection.manifest import load_manifest
    from model.nvila import load_tokenizer
    from training_hooks.bootstrap import init_tiny_model
    from training_hooks.proxies import seed_manifest, train_proxies

    synthesize(str(tmp_path / "t"), SynthConfig(seed=4, datasets=[DatasetSpec("trusted", "pair", 24, {}, 12)]))
    synthesize(str(tmp_path / "o"), SynthConfig(seed=7, datasets=[DatasetSpec("other", "pair", 24, {}, 12)]))
    url = seed_manifest([str(tmp_path / "o" / "other")], str(tmp_path / "ow"), str(tmp_path / "oc"))
    given = init_tiny_model(load_manifest(url), str(tmp_path / "given"), size="tiny", seed=3, image_mode="resize")
    trusted = str(tmp_path / "t" / "trusted")
    with pytest.raises(ValueError, match="capability mode only"):
        train_proxies(trusted, str(tmp_path / "x"), mode="reference", pool=trusted, inits=(None, given))
    res = train_proxies(trusted, str(tmp_path / "proxies"), steps=2, batch_size=4, max_rounds=1, round_steps=2,
                        image_mode="resize", inits=(None, given), info=lambda t: None)
    record = json.loads((tmp_path / "proxies" / "proxies.json").read_text())
    assert record["large"]["init"] == given and record["small"]["init"] == "random"
    assert load_tokenizer(res["small"]["dir"]).get_vocab() == load_tokenizer(given).get_vocab()
    start = NVILAForCausalLM.from_pretrained(given).state_dict()
    after = NVILAForCausalLM.from_pretrained(res["large"]["dir"]).state_dict()
    assert set(after) == set(start)
    moved = sum(float((after[k].float() - start[k].float()).norm()) for k in start)
    size = sum(float(start[k].float().norm()) for k in start)
    assert 0 < moved < 0.1 * size  # trained a little from the given weights, not from fresh ones
    # two given models must already share a tokenizer
    own = init_tiny_model(load_manifest(record["manifest"]), str(tmp_path / "own"), size="tiny", image_mode="resize")
    with pytest.raises(ValueError, match="different tokenizers"):
        train_proxies(trusted, str(tmp_path / "y"), image_mode="resize", inits=(own, given))
