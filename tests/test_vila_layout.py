"""NVILA in VILA's three-folder layout: strict loading, byte-identical round trips, VILA's
projector formula, and the commands that take a model directory (train, eval, deltaloss)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from model import NVILAConfig, NVILAForCausalLM
from model.config import ConfigError
from model.nvila import load_tokenizer
from model.tokenizer import train_bpe_tokenizer
from vila_fixture import make_vila_dir, vila_projector_output, vila_sequential, write_json

TEXTS = ["a red circle on a blue background", "a purple star on a yellow background", "Describe the image.",
         "Describe the video."] * 10
PROJECTORS = [("mlp_downsample", 2), ("mlp_downsample_2x2_fix", 2), ("mlp_downsample_3x3_fix", 3)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dp, _, fn in os.walk(root):
        for f in fn:
            p = os.path.join(dp, f)
            with open(p, "rb") as h:
                out[os.path.relpath(p, root)] = h.read()
    return out


@pytest.mark.parametrize("projector,k", PROJECTORS)
def test_vila_dir_loads_strictly_and_round_trips_byte_identically(tmp_path, tok, projector, k):
    src = make_vila_dir(str(tmp_path / "src"), tok, projector=projector)
    m = NVILAForCausalLM.from_pretrained(src)
    assert m.config.projector_type == f"mlp_downsample_{k}x{k}"
    assert (m.config.image_mode, m.config.s2_scales, m.config.max_tiles, m.config.video_pool_size) == ("dynamic_s2", [32, 64], 4, 2)
    assert m.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    m.save_pretrained(str(tmp_path / "out"), layout="vila")
    m.save_pretrained(str(tmp_path / "out_tok"), load_tokenizer(src), layout="vila")
    before = _files(src)
    assert len(before) >= 10
    assert _files(str(tmp_path / "out")) == before
    assert _files(str(tmp_path / "out_tok")) == before


def test_transformers4_vision_names_load_and_are_written_back(tmp_path, tok):
    """VILA's transformers 4 wrote SigLIP's tensors as vision_model.*: read them, write them back so."""
    from safetensors.torch import load_file, save_file

    src = make_vila_dir(str(tmp_path / "src"), tok)
    f = f"{src}/vision_tower/model.safetensors"
    save_file({"vision_model." + k: v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    m = NVILAForCausalLM.from_pretrained(src)
    m.save_pretrained(str(tmp_path / "out"), layout="vila")
    assert _files(str(tmp_path / "out")) == _files(src)


@pytest.mark.parametrize("projector,k", PROJECTORS)
def test_projector_computes_vilas_formula(tmp_path, tok, projector, k):
    from safetensors.torch import load_file

    src = make_vila_dir(str(tmp_path / "src"), tok, projector=projector)
    m = NVILAForCausalLM.from_pretrained(src)
    seq = vila_sequential(projector, 64, 64)
    seq.load_state_dict({k_[len("layers."):]: v.float() for k_, v in load_file(f"{src}/mm_projector/model.safetensors").items()})
    torch.manual_seed(1)
    for h in (4, 5):  # 5: zero padding at the bottom and the right
        x = torch.randn(2, h, h, 64)
        with torch.no_grad():
            assert torch.allclose(m.projector(x), vila_projector_output(seq, k, x), atol=1e-5)


def test_ours_to_vila_and_back_computes_the_same(tmp_path, tok):
    from model.examples import ExampleBuilder
    from model.conversation import collate
    from curation.data.samples import PairSample
    from curation.corpus.synth import Scene, encode_image, render_scene

    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    lc = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    ours = NVILAForCausalLM(NVILAConfig(vision_config=vc, llm_config=lc, projector_type="mlp_downsample_3x3",
                                        s2_scales=[32, 64], max_tiles=4, video_pool_size=2, video_num_frames=4))
    ours.attach_tokenizer(tok)
    ours.to(torch.bfloat16).to(torch.float32)  # VILA's layout stores bf16: start from bf16-exact weights
    ours.save_pretrained(str(tmp_path / "v"), tok, layout="vila")
    top = json.load(open(tmp_path / "v" / "config.json"))
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample_3x3_fix" and top["s2_scales"] == "32,64"
    back = NVILAForCausalLM.from_pretrained(str(tmp_path / "v"))
    img = encode_image(render_scene(Scene("circle", "red", "blue", "center"), 48, 40, np.random.default_rng(0)), "png")
    s = PairSample(dataset="d", shard="s", key="k", image=img, image_ext="png", caption=TEXTS[0], width=48, height=40)
    with torch.no_grad():
        a = ours(**collate([ExampleBuilder(ours, tok, 512)(s)], tok.pad_token_id)).logits
        b = back(**collate([ExampleBuilder(back, load_tokenizer(str(tmp_path / "v")), 512)(s)], tok.pad_token_id)).logits
    assert torch.allclose(a, b, atol=1e-4)  # the same weights; kernels may differ in the last bits


def _edit_json(path, **kw):
    d = json.load(open(path))
    d.update(kw)
    write_json(path, d)


def test_unsupported_fields_and_stray_tensors_are_named(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    src = make_vila_dir(str(tmp_path / "a"), tok, extra={"ps3": True})
    with pytest.raises(ConfigError, match="'ps3' = True"):
        NVILAForCausalLM.from_pretrained(src)
    src = make_vila_dir(str(tmp_path / "b"), tok, extra={"mm_newfangled_pooling": "x"})
    with pytest.raises(ConfigError, match="'mm_newfangled_pooling'"):
        NVILAForCausalLM.from_pretrained(src)
    src = make_vila_dir(str(tmp_path / "c"), tok, extra={"image_aspect_ratio": "pad", "dynamic_s2": False})
    with pytest.raises(ConfigError, match="'image_aspect_ratio' = 'pad'"):
        NVILAForCausalLM.from_pretrained(src)
    src = make_vila_dir(str(tmp_path / "d"), tok)
    _edit_json(f"{src}/mm_projector/config.json", mm_projector_type="mlp_downsample_3x3_s2")
    with pytest.raises(ConfigError, match="mm_projector_type"):
        NVILAForCausalLM.from_pretrained(src)
    # a tensor the model would not use, in the LLM's file
    src = make_vila_dir(str(tmp_path / "e"), tok)
    t = load_file(f"{src}/llm/model.safetensors")
    t["model.extra_head.weight"] = torch.zeros(2, 2)
    save_file(t, f"{src}/llm/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="model.extra_head.weight"):
        NVILAForCausalLM.from_pretrained(src)
    # a projector tensor missing
    src = make_vila_dir(str(tmp_path / "f"), tok)
    t = load_file(f"{src}/mm_projector/model.safetensors")
    del t["layers.7.bias"]
    save_file(t, f"{src}/mm_projector/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing \['layers.7.bias'\]"):
        NVILAForCausalLM.from_pretrained(src)
    # mm_hidden_size that does not match the tower and the scales
    src = make_vila_dir(str(tmp_path / "g"), tok, extra={"mm_hidden_size": 96})
    with pytest.raises(ConfigError, match="'mm_hidden_size' = 96"):
        NVILAForCausalLM.from_pretrained(src)


def _tokenizer_without_sep():
    """Like a released NVILA's: <image> and <vila/video> but no <vila/sep>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<vila/video>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_released_tokenizer_without_sep_gets_the_same_ids_every_load(tmp_path):
    """Every load appends <vila/sep> with the same id and the same (mean) embedding, so the
    trainer, eval and DeltaLoss agree; saving writes the grown embeddings and vocab size."""
    tok = _tokenizer_without_sep()
    src = make_vila_dir(str(tmp_path / "s"), tok)
    a, b = NVILAForCausalLM.from_pretrained(src), NVILAForCausalLM.from_pretrained(src)
    t = load_tokenizer(src)
    assert a.config.sep_token_id == b.config.sep_token_id == t.convert_tokens_to_ids("<vila/sep>") == len(tok)
    ea, eb = a.llm.get_input_embeddings().weight, b.llm.get_input_embeddings().weight
    assert torch.equal(ea, eb) and torch.allclose(ea[len(tok)], ea[:len(tok)].mean(0))
    a.save_pretrained(str(tmp_path / "o"), t, layout="vila")
    c = NVILAForCausalLM.from_pretrained(str(tmp_path / "o"))
    # written in the source's model_dtype (bf16)
    assert c.llm.config.vocab_size == len(tok) + 1
    assert torch.equal(c.llm.get_input_embeddings().weight, ea.detach().to(torch.bfloat16).float())


def test_deltaloss_scores_with_vila_directories(tmp_path, tok):
    from curation.corpus.synth import Scene, encode_image, render_scene
    from curation.data.samples import PairSample
    from scorers.deltaloss import DeltaLossScorer

    small = make_vila_dir(str(tmp_path / "small"), tok, projector="mlp_downsample", seed=0)
    large = make_vila_dir(str(tmp_path / "large"), tok, projector="mlp_downsample_3x3_fix", seed=1)
    img = encode_image(render_scene(Scene("circle", "red", "blue", "center"), 48, 48, np.random.default_rng(0)), "png")
    samples = [PairSample(dataset="d", shard="s", key=f"k{i}", image=img, image_ext="png", caption=c, width=48, height=48)
               for i, c in enumerate(TEXTS[:2])]
    sc = DeltaLossScorer(small=small, large=large, max_length=512)
    cols = sc.compute(sc.prepare(samples))
    for i in range(2):
        assert cols["answer_tokens"][i] > 0
        assert cols["delta_loss"][i] == pytest.approx(cols["loss_small"][i] - cols["loss_large"][i])
    # the losses are the models' own: the small model scored directly gives the same number
    m = NVILAForCausalLM.from_pretrained(small)
    from model.conversation import collate
    from model.examples import ExampleBuilder

    b = collate([ExampleBuilder(m, load_tokenizer(small), 512)(samples[0])], tok.pad_token_id)
    with torch.no_grad():
        assert float(m(**b).loss) == pytest.approx(cols["loss_small"][0], rel=1e-4)
