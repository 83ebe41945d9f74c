"""Hugging Face image-text-to-text models as DeltaLoss models: tiny random Qwen2-VL and Idefics3
(SmolVLM's architecture) pairs score a mixed shard of pairs, documents and videos."""

from __future__ import annotations

import itertools

import pytest

from curation.corpus.synth import synthesize
from curation.data.shards import list_shards, read_shard
from scorers.deltaloss import DeltaLossScorer
from hf_vlm_fixture import make_pair

TEXTS = ["a red circle on a blue background", "a purple star on a yellow background", "Describe the image.",
         "Describe the video.", "Write the document.", "User: Assistant:", "the quick brown fox"] * 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import noisy_config

    root = tmp_path_factory.mktemp("vlm")
    synthesize(str(root / "corpus"), noisy_config(seed=5, pairs=8, docs=4, videos=4))
    mixed = []
    for ds in ("coyo_synth", "mmc4_synth", "video_synth"):
        shard = list_shards(str(root / "corpus" / ds))[0]
        mixed += list(itertools.islice((s for s in read_shard(shard, dataset=ds) if not s.error), 3))
    models = {fam: make_pair(str(root), fam, TEXTS) for fam in ("qwen2_vl", "idefics3")}
    return {"samples": mixed, "models": models}


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_a_pair_of_one_family_scores_pairs_documents_and_videos(setup, family):
    small, large = setup["models"][family]
    samples = setup["samples"]
    sc = DeltaLossScorer(small=small, large=large, max_length=2048, token_budget=4096)
    prepared = sc.prepare(samples)
    cols = sc.compute(prepared)
    kinds = [s.kind for s in samples]
    assert sorted(set(kinds)) == ["interleaved", "pair", "video"]
    for i, s in enumerate(samples):
        assert prepared.errors[i] is None, (s.kind, prepared.errors[i])
        assert cols["answer_tokens"][i] > 0 and cols["loss_small"][i] > 0 and cols["loss_large"][i] > 0
        assert cols["delta_loss"][i] == pytest.approx(cols["loss_small"][i] - cols["loss_large"][i])
    # batching by the token budget changes nothing: one sample per batch gives the same losses
    one = DeltaLossScorer(small=small, large=large, max_length=2048, token_budget=2048)
    one.small.vlm.token_budget = one.large.vlm.token_budget = 1  # force batches of one
    alone = one.compute(one.prepare(samples))
    assert alone["loss_small"] == pytest.approx(cols["loss_small"], rel=1e-4)
    assert alone["answer_tokens_large"] == cols["answer_tokens_large"]
    assert len(sc.small.vlm.batches(prepared.payload[0])) < len(samples)  # the big budget did batch


def test_only_the_answer_is_scored(setup):
    """Qwen2-VL's ChatML: the answer is the caption's tokens and the newline after <|im_end|>
    (the turn end itself is a special token); the prompt is never scored."""
    small, large = setup["models"]["qwen2_vl"]
    pairs = [s for s in setup["samples"] if s.kind == "pair"][:2]
    sc = DeltaLossScorer(small=small, large=large, max_length=2048, prompts=("Describe the image.",))
    cols = sc.compute(sc.prepare(pairs))
    other = DeltaLossScorer(small=small, large=large, max_length=2048, prompts=("the quick brown fox " * 5,))
    cols2 = other.compute(other.prepare(pairs))
    tok = sc.small.tokenizer
    for i, s in enumerate(pairs):
        assert cols["answer_tokens"][i] == len(tok(s.caption.strip(), add_special_tokens=False)["input_ids"]) + 1
        assert cols2["answer_tokens"][i] == cols["answer_tokens"][i]


def test_mixed_families_need_separate_tokenization(setup):
    q_small, _ = setup["models"]["qwen2_vl"]
    _, i_large = setup["models"]["idefics3"]
    sc = DeltaLossScorer(small=q_small, large=i_large, max_length=2048)
    with pytest.raises(ValueError, match="separate_tokenization"):
        sc.setup()
    sc = DeltaLossScorer(small=q_small, large=i_large, max_length=2048, separate_tokenization=True)
    samples = setup["samples"]
    cols = sc.compute(sc.prepare(samples))
    assert all(c is not None and c > 0 for c in cols["answer_tokens"])
    assert sc.config()["token_budget"] == 8192
