"""`curate init-model --size` presets shaped like the released NVILA models, built on the meta
device (no memory, no weights) and counted against the released models' configurations.

Sources of the expected shapes (public configs):
- NVILA-8B: its config.json as reproduced in NVIDIA/TensorRT-LLM
  tests/unittest/_torch/modeling/test_modeling_vila.py (NVILA_8B_CONFIG): llm_cfg Qwen2 with
  hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab 151648, untied;
  vision_tower_cfg SigLIP hidden 1152, intermediate 4304, 27 layers, image 448, patch 14,
  vision_use_head false; mm_hidden_size 3456 (3 S2 scales), mm_projector_type mlp_downsample.
- NVILA-Lite-2B: the same SigLIP so400m-448 tower, Qwen2-1.5B (Qwen/Qwen2-1.5B-Instruct config:
  hidden 1536, intermediate 8960, 28 layers, 12 heads, 2 KV heads, vocab 151936, tied), and VILA's
  mlp_downsample_3x3_fix projector over one scale (mm_hidden_size 1152).
The expected counts are written out below from those numbers, independently of the model code.
"""

from __future__ import annotations

import pytest
import torch

from model import NVILAForCausalLM
from training_hooks.bootstrap import SIZES, preset_config


def siglip(h=1152, i=4304, layers=27, image=448, patch=14) -> int:
    embed = 3 * patch * patch * h + h + (image // patch) ** 2 * h
    layer = 4 * h + 4 * (h * h + h) + (h * i + i) + (i * h + h)
    return embed + layers * layer + 2 * h  # + post_layernorm; no pooling head


def qwen2(h, inter, layers, heads, kv_heads, vocab, tied) -> int:
    kv = kv_heads * (h // heads)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    return vocab * h * (1 if tied else 2) + layers * layer + h


def projector(kind, c, d) -> int:
    if kind == "2x2":
        return 2 * 4 * c + (4 * c * d + d) + (d * d + d)
    return 2 * 9 * c + (9 * c * 3 * c + 3 * c) + 2 * 3 * c + (3 * c * d + d) + (d * d + d)


RELEASED = {
    "nvila-8b": siglip() + qwen2(3584, 18944, 28, 28, 4, 151648, tied=False) + projector("2x2", 3 * 1152, 3584),
    "nvila-lite-2b": siglip() + qwen2(1536, 8960, 28, 12, 2, 151936, tied=True) + projector("3x3", 1152, 1536),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_parameter_count_matches_the_released_model(name):
    with torch.device("meta"):
        model = NVILAForCausalLM(preset_config(SIZES[name], vocab_size=600))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - RELEASED[name]) / RELEASED[name] < 0.01, (name, n, RELEASED[name])
    assert 7.9e9 < RELEASED["nvila-8b"] < 8.3e9 and 1.9e9 < RELEASED["nvila-lite-2b"] < 2.1e9  # the names' sizes


def test_presets_tile_and_project_like_the_released_models():
    lite, big = (preset_config(SIZES[n], 600) for n in ("nvila-lite-2b", "nvila-8b"))
    assert (lite.projector_type, lite.image_mode, lite.tile_size) == ("mlp_downsample_3x3", "dynamic", 448)
    assert (big.projector_type, big.image_mode, big.s2_scales) == ("mlp_downsample_2x2", "dynamic_s2", [448, 896, 1344])
    # 448 px / patch 14 = 32x32 patches: 3x3 -> 11x11 = 121 tokens a tile, 2x2 -> 16x16 = 256
    with torch.device("meta"):
        m = NVILAForCausalLM(lite)
        out = m.projector(torch.empty(1, 32, 32, 1152, device="meta"))
    assert tuple(out.shape) == (1, 11, 11, 1536)
