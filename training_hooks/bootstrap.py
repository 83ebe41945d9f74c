"""A tiny NVILA to start from, built for a manifest (tests, the demo, the pruning benchmark).

Real runs start from a real NVILA (or SigLIP + Qwen2) directory. Here, where no weights can
be downloaded, a small byte-level BPE tokenizer is trained on the curated captions and a
small NVILA is built from configs, saved, and loaded back through ``from_pretrained`` like any
user checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

TINY = {
    "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8),
    "llm": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
}
# The demo's NVILA: TINY with a third vision layer, so the feature layer (-2) sits after two
# transformer layers. At the 32-pixel tile a synthetic shape is 10-17 pixels across (20-34 at the
# second S2 scale): 8-pixel patches learn to tell shapes apart far sooner than 4-pixel ones
# (a shape probe on the tower: 83 % vs 52 % after the same 300 steps) at a quarter of the tokens.
# The demo pretrains this tower before the stages (training_hooks/vision_pretrain.py, caption words).
DEMO = {
    "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                   image_size=32, patch_size=8),
    "llm": TINY["llm"],
}
SMALL = {
    "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   image_size=48, patch_size=8),
    "llm": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True),
}

# Shaped like the released NVILA models, for GPU runs (built untrained; real weights come from a
# released checkpoint, see NVILAForCausalLM.from_pretrained). The tower is SigLIP so400m at 448 px
# without its pooling head (NVILA-8B's vision_tower_cfg: vision_use_head false).
SO400M_448 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=448, patch_size=14, vision_use_head=False)
NVILA_LITE_2B = {  # NVILA-Lite: Qwen2-1.5B, 3x3 projector, dynamic tiling without S2
    "vision": SO400M_448,
    "llm": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True),
    "nvila": dict(projector_type="mlp_downsample_3x3", image_mode="dynamic", s2_scales=[448], max_tiles=12,
                  video_num_frames=32, video_pool_size=8),
}
NVILA_8B = {  # NVILA-8B: Qwen2.5-7B with NVILA's vocabulary, 2x2 projector over three S2 scales
    "vision": SO400M_448,
    "llm": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=151648, max_position_embeddings=32768, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False),
    "nvila": dict(projector_type="mlp_downsample_2x2", image_mode="dynamic_s2", s2_scales=[448, 896, 1344],
                  max_tiles=12, video_num_frames=32, video_pool_size=8),
}
SIZES: dict[str, dict[str, Any]] = {"tiny": TINY, "demo": DEMO, "small": SMALL, "nvila-lite-2b": NVILA_LITE_2B,
                                    "nvila-8b": NVILA_8B}


def preset_config(spec: dict[str, Any], vocab_size: int) -> Any:
    """The NVILAConfig of a size spec: small sizes take the tokenizer's vocabulary and tiny S2
    tiling; presets keep their own (grown if the tokenizer needs more)."""
    from model import NVILAConfig

    if "nvila" in spec:
        llm = dict(spec["llm"], vocab_size=max(vocab_size, spec["llm"].get("vocab_size", 0)))
        return NVILAConfig(vision_config=dict(spec["vision"]), llm_config=llm, **spec["nvila"])
    tile = spec["vision"]["image_size"]
    return NVILAConfig(vision_config=dict(spec["vision"]), llm_config=dict(spec["llm"], vocab_size=vocab_size),
                       image_mode=spec.get("image_mode", "dynamic_s2"), s2_scales=[tile, 2 * tile], max_tiles=4,
                       video_num_frames=4, video_pool_size=2)


def corpus_texts(manifest: Any, limit: int = 2000) -> list[str]:
    from curation.data.shards import read_shard

    texts: list[str] = []
    for ds, out in manifest.outputs.items():
        n = 0
        for shard in out.shards:
            for s in read_shard(shard.url, kind=out.kind, dataset=ds, verify=False):
                if s.error:
                    continue
                if s.kind == "interleaved":
                    texts.extend(s.text_list)
                elif s.caption:
                    texts.append(s.caption)
                n += 1
                if n >= limit:
                    break
            if n >= limit:
                break
    return texts


PROMPTS = ("Describe the image.", "What is in this picture?", "Write a short caption.",
           "Describe the video.", "What happens in this clip?")


def init_tiny_model(manifest: Any, out_dir: str, size: str | dict[str, Any] = "tiny", seed: int = 0,
                    vocab_size: int = 600, image_mode: str = "dynamic_s2", prompts: tuple[str, ...] = PROMPTS) -> str:
    """Build a small NVILA (``size``: a name above or a ``{"vision": ..., "llm": ...}`` spec) and a BPE
    tokenizer trained on the manifest's captions plus ``prompts``; save both to ``out_dir``."""
    import torch

    from model import NVILAForCausalLM
    from model.tokenizer import train_bpe_tokenizer

    if not isinstance(size, dict) and size not in SIZES:
        raise ValueError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    spec = size if isinstance(size, dict) else SIZES[size]
    texts = corpus_texts(manifest) + list(prompts)
    tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    cfg = preset_config(dict(spec, image_mode=image_mode) if "nvila" not in spec else spec, len(tok))
    torch.manual_seed(seed)
    model = NVILAForCausalLM(cfg)
    model.attach_tokenizer(tok)
    model.save_pretrained(out_dir, tok)
    return out_dir


def init_pretrained_model(manifest: Any, out_dir: str, pairs_dir: str, *, pairs: int, steps: int, seed: int = 0,
                          pairs_seed: int = 0, objective: str = "words", size: str | dict[str, Any] = "demo",
                          image_mode: str = "dynamic_s2",
                          prompts: tuple[str, ...] = PROMPTS, info: Callable[[str], None] = lambda s: None,
                          workers: int = 1) -> dict[str, Any]:
    """``init_tiny_model``, then its vision tower pretrained (``vision_pretrain``, ``objective``) on
    ``pairs`` clean synthetic pairs, written to ``pairs_dir`` (seed ``pairs_seed``) unless already
    there (by ``workers`` processes): the stand-in for the pretrained SigLIP NVILA starts from;
    the caption-word pretraining also runs on ``workers`` data-parallel processes on a CPU.
    Returns the pretraining report."""
    from contextlib import nullcontext

    from training_hooks.vision_parallel import SpawnedRanks
    from training_hooks.vision_pretrain import data_parallel_workers, pretrain_vision

    parallel = data_parallel_workers(objective, workers)
    # the data-parallel ranks start up while the model is built and the pairs are read
    with SpawnedRanks(parallel) if parallel > 1 else nullcontext() as ranks:
        init_tiny_model(manifest, out_dir, size=size, seed=seed, image_mode=image_mode, prompts=prompts)
        shards = synthesize_pretrain_pairs(pairs_dir, pairs, pairs_seed, workers)
        return pretrain_vision(out_dir, shards, objective=objective, steps=steps,
                               batch_size=min(128, pairs // 4), seed=seed, info=info, workers=workers, ranks=ranks)


def synthesize_pretrain_pairs(pairs_dir: str, pairs: int, pairs_seed: int, workers: int = 1,
                              decode_for: str | dict[str, Any] | None = None) -> str:
    """The clean pairs the vision tower pretrains on (``<pairs_dir>/pretrain_pairs``), synthesized
    unless already there; they depend on ``pairs`` and ``pairs_seed`` only (each shard is drawn
    from its own seed, so ``workers`` changes nothing in them). ``decode_for`` (a size): also read
    and decode them once for that size's tower (``training_hooks.decoded_pairs``), so that its
    pretraining need not."""
    import os

    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from training_hooks import decoded_pairs

    if not os.path.isfile(os.path.join(pairs_dir, "ground_truth.parquet")):
        synthesize(pairs_dir, SynthConfig(seed=pairs_seed, datasets=[DatasetSpec("pretrain_pairs", "pair", pairs, {}, 1000)]),
                   workers=workers)
    shards = os.path.join(pairs_dir, "pretrain_pairs")
    if decode_for is not None:
        tile = int((decode_for if isinstance(decode_for, dict) else SIZES[decode_for])["vision"]["image_size"])
        if not decoded_pairs.fresh(shards, tile):
            decoded_pairs.write(shards, tile)
    return shards
