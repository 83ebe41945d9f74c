"""Tiny scoring models (random weights) in their real on-disk layouts: a CLIP and two NVILAs, for
tests of fused passes (``test_scoring_pass.py``, and the flow path in ``test_flows.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny CLIP and two tiny NVILAs (random weights), saved in their real layouts."""
    import open_clip
    import torch

    from model import NVILAConfig, NVILAForCausalLM
    from model.tokenizer import train_bpe_tokenizer
    from scorers.clip import register_configs, save_open_clip_dir

    root = tmp_path_factory.mktemp("models")
    register_configs()
    torch.manual_seed(0)
    clip = str(root / "clip")
    save_open_clip_dir(open_clip.create_model("tiny-clip"), open_clip.get_model_config("tiny-clip"), clip, {"size": 64})
    tok = train_bpe_tokenizer(["a red circle on a blue background", "Describe the image."] * 10, vocab_size=300)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    lc = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)
    paths = {"clip": clip}
    for name in ("small", "large"):
        m = NVILAForCausalLM(NVILAConfig(vision_config=vc, llm_config=lc, image_mode="resize"))
        m.attach_tokenizer(tok)
        paths[name] = str(root / name)
        m.save_pretrained(paths[name], tok)
    return paths
