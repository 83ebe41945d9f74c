"""Tiny NVILA checkpoints in VILA's on-disk layout, written the way VILA writes them.

Built without our writer: the LLM and the tower are transformers' own Qwen2 and SigLIP models
saved by their ``save_pretrained``, the projector is VILA's ``nn.Sequential`` rebuilt here from
its published shape (downsample block at index 0, then LayerNorm / Linear / GELU), saved with
safetensors under its module names, and the top config carries VILA's fields
(``PretrainedConfig.to_json_string`` format: sorted keys, indent 2).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

TILE, PATCH = 32, 8


def vila_sequential(kind: str, c: int, d: int) -> nn.Sequential:
    """VILA's projector stack for ``mm_hidden_size`` c and LLM width d (index 0: the downsample block)."""
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return nn.Sequential(nn.Identity(), nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d))
    if kind == "mlp_downsample_3x3_fix":
        return nn.Sequential(nn.Identity(), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                             nn.LayerNorm(3 * c), nn.Linear(3 * c, d), nn.GELU(), nn.Linear(d, d))
    raise ValueError(kind)


def vila_projector_output(seq: nn.Sequential, k: int, x: torch.Tensor) -> torch.Tensor:
    """VILA's formula, written out element by element: zero-pad rows and columns at the end up to
    multiples of k, then out[n, r, q, (i*k + j)*C + ch] = x[n, k*r + i, k*q + j, ch]; then the stack."""
    n, h, w, c = x.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    padded = torch.zeros(n, hp, wp, c, dtype=x.dtype)
    padded[:, :h, :w] = x
    out = torch.zeros(n, hp // k, wp // k, k * k * c, dtype=x.dtype)
    for r in range(hp // k):
        for q in range(wp // k):
            for i in range(k):
                for j in range(k):
                    out[:, r, q, (i * k + j) * c:(i * k + j + 1) * c] = padded[:, k * r + i, k * q + j]
    for layer in list(seq)[1:]:
        out = layer(out)
    return out


def write_json(path: str, d: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")


def make_vila_dir(root: str, tok, projector: str = "mlp_downsample_3x3_fix", aspect: str = "dynamic_s2",
                  seed: int = 0, extra: dict | None = None) -> str:
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                       tie_word_embeddings=True)).to(torch.bfloat16)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=2, image_size=TILE, patch_size=PATCH)).to(torch.bfloat16)
    llm.save_pretrained(os.path.join(root, "llm"))
    tok.save_pretrained(os.path.join(root, "llm"))
    vision.save_pretrained(os.path.join(root, "vision_tower"))
    SiglipImageProcessor(size={"height": TILE, "width": TILE}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(os.path.join(root, "vision_tower"))
    scales = [TILE, 2 * TILE] if aspect == "dynamic_s2" else [TILE]
    mm_hidden = 32 * len(scales) if aspect == "dynamic_s2" else 32
    seq = vila_sequential(projector, mm_hidden, 64).to(torch.bfloat16)
    os.makedirs(os.path.join(root, "mm_projector"))
    save_file({f"layers.{k}": v.contiguous() for k, v in seq.state_dict().items()},
              os.path.join(root, "mm_projector", "model.safetensors"), metadata={"format": "pt"})
    proj_cfg = {"architectures": ["MultimodalProjector"], "mm_projector_type": projector, "model_type": "v2l_projector",
                "torch_dtype": "bfloat16", "transformers_version": "4.46.0"}
    write_json(os.path.join(root, "mm_projector", "config.json"), proj_cfg)
    top = {
        "_name_or_path": root, "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
        "model_dtype": "torch.bfloat16", "resume_path": root, "transformers_version": "4.46.0",
        "llm_cfg": llm.config.to_dict(), "vision_tower_cfg": vision.config.to_dict(), "mm_projector_cfg": proj_cfg,
        "hidden_size": 64, "mm_hidden_size": mm_hidden, "image_aspect_ratio": aspect, "dynamic_s2": aspect == "dynamic_s2",
        "s2": False, "s2_scales": ",".join(map(str, scales)), "s2_max_split_size": TILE, "max_tiles": 4,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "num_video_frames": 4,
        "video_encoder": json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[2, 1, 1]]}),
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_vision_tower": True,
        "tune_mm_projector": True, "tune_language_model": True, "interpolate_mode": "linear", "vision_resolution": -1,
        "s2_resize_output_to_scale_idx": -1, "fps": 0.0, "num_time_tokens": 0, "chat_template": None,
        **(extra or {}),
    }
    write_json(os.path.join(root, "config.json"), top)
    return root


POLICY = {
    "defaults": [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 1}],
    "stages": {"align": {"coyo_synth": 1.0}, "pretrain": {"mmc4_synth": 1.0, "coyo_synth": 1.0},
               "image_sft": {"coyo_synth": 1.0}, "video_sft": {"video_synth": 1.0, "coyo_synth": 0.5}},
}


def small_manifest(root: str, pairs: int = 40, docs: int = 8, videos: int = 8):
    """A curated manifest over a small synthetic corpus (basic scores only): (manifest, url, corpus)."""
    from conftest import noisy_config
    from curation.corpus.synth import synthesize
    from curation.data.shards import dataset_of, list_shards
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local
    from curation.selection.curate import curate

    corpus, work = os.path.join(root, "corpus"), os.path.join(root, "work")
    synthesize(corpus, noisy_config(seed=3, pairs=pairs, docs=docs, videos=videos))
    tasks = [ShardTask(u, dataset_of(u)) for ds in ("coyo_synth", "mmc4_synth", "video_synth")
             for u in list_shards(f"{corpus}/{ds}")]
    assert not score_local(tasks, ScorerSpec("basic"), work).failed
    manifest, url = curate(work, POLICY, os.path.join(root, "curated"), use_ray=False)
    return manifest, url, corpus


def corpus_tokenizer(manifest):
    """A BPE tokenizer over the manifest's texts and the trainer's prompts (stands in for Qwen2's)."""
    from model.tokenizer import train_bpe_tokenizer
    from training_hooks.bootstrap import PROMPTS, corpus_texts

    return train_bpe_tokenizer(corpus_texts(manifest) + list(PROMPTS), vocab_size=600)
