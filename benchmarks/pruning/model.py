"""THE model and training budget every arm uses: the one place to switch them.

``benchmark_model`` builds the NVILA every arm starts from (one initialization per seed, the
same for every arm), ``training_recipe`` the budget (same steps, batch and learning rate for
every arm). To measure pruning with another model or budget, change these two functions and
nothing else.
"""

from __future__ import annotations

from typing import Any

# The demo's NVILA (training_hooks/bootstrap.py DEMO: 8-pixel patches, Dynamic-S2 at 32 and 64
# pixels) with its vision tower pretrained on clean pairs of its own before any arm trains
# (training_hooks/vision_pretrain.py), as the demo does: caption-word classification (objective
# "words"), 20000 pairs, 6000 steps; the stand-in for starting from a pretrained SigLIP. (With
# SigLIP's sigmoid loss the shape stayed at chance in every arm; figures in the README.) The
# pretrained tower trains at VISION_LR_RATIO of the LR, as in the demo.
IMAGE_MODE = "dynamic_s2"
PRETRAIN_PAIRS = 20000
PRETRAIN_STEPS = 6000

STEPS = 300
BATCH = 16
LR = 2e-3
VISION_LR_RATIO = 0.02


def benchmark_model(manifest: Any, out_dir: str, seed: int) -> str:
    """Build, pretrain, save and return the directory of the NVILA all arms of ``seed`` start from.
    The tokenizer is trained on ``manifest``'s captions (pass the same manifest for every seed's
    arms: the full pool's, so no arm's vocabulary depends on its selection)."""
    import os

    from training_hooks.bootstrap import init_pretrained_model

    # one clean set of uniformly random scenes for every seed; like SigLIP's data it may show the
    # held-out set's combinations, and every arm of a seed starts from the same pretrained tower
    pairs = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "pretrain-pairs")
    init_pretrained_model(manifest, out_dir, pairs, pairs=PRETRAIN_PAIRS, steps=PRETRAIN_STEPS, seed=seed, pairs_seed=9000,
                          objective="words",
                          image_mode=IMAGE_MODE, prompts=("Describe the image.", "What is in this picture?", "Write a short caption."))
    return out_dir


def training_recipe(init: str, output: str, seed: int, steps: int = STEPS) -> dict[str, Any]:
    """The ``curate train`` recipe of one arm: the same budget for every arm."""
    return {"init": init, "output": output, "seed": seed, "ray": {"enabled": False},
            "defaults": {"batch_size": BATCH, "max_length": 256, "save_every": steps, "warmup_steps": 20},
            "stages": {"image_sft": {"steps": steps, "lr": LR, "vision_lr_ratio": VISION_LR_RATIO}}}
