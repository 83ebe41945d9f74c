"""THE model and training budget every arm uses: the one place to switch them.

``benchmark_model`` builds the NVILA every arm of a seed starts from (one initialization per
seed, the same for every arm), ``training_recipe`` one arm's run (same batch, learning rate and
schedule for every arm), ``arm_steps`` its optimizer steps under the budget:

- ``epochs`` (default): every arm makes ``epochs`` passes over its own kept data, so an arm that
  keeps half the pool takes half the optimizer steps (NVILA's claim: the same accuracy for about
  half the training compute);
- ``steps``: every arm takes the steps full data takes at ``epochs`` (a 50 % arm then sees its
  data twice as often).

The trainer holds out the same share of every arm's data for its held-out loss, so the epoch
counts are nominal (over the kept samples) and the same for every arm.
"""

from __future__ import annotations

import math
from typing import Any

# The demo's NVILA (training_hooks/bootstrap.py DEMO: 8-pixel patches) at one image scale
# ("resize": the whole image as one 32-pixel tile, 4 LLM tokens; Dynamic-S2's 32 + 64 pixels cost
# 5 tiles and 16 tokens per image) with its vision tower pretrained
# on clean pairs of its own before any arm trains (training_hooks/vision_pretrain.py), as the demo
# does: caption-word classification (objective "words"); the stand-in for starting from a
# pretrained SigLIP. Its pairs (benchmarks/pruning/pool.py) never show the held-out (shape, colour)
# pairs. The pretrained tower trains at VISION_LR_RATIO of the LR, as in the demo. The proxies
# tile images the same way (benchmarks/pruning/arms.py).
IMAGE_MODE = "resize"
PRETRAIN_PAIRS = 8000
PRETRAIN_STEPS = 1500

# The DeltaLoss proxies (benchmarks/pruning/arms.py), both trained to convergence on the same
# data: NVILA's small and large models differ in capacity, so the small one cannot fit what the
# large one fits. SMALL_PROXY (~85 k parameters) has half the tiny NVILA's vision width and one
# 48-wide LLM layer (tiny: two, 128 wide), and its projector reads the patch embeddings after one
# vision layer (the feature layer is -2 of 2); LARGE_PROXY is bootstrap's "small" NVILA (4 vision
# and 4 LLM layers, 256 wide, 4.2 M parameters: ~50x).
SMALL_PROXY = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                   image_size=32, patch_size=8),
    "llm": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True),
}
LARGE_PROXY = "small"
# the proxies' learning rates (from random weights): the large one at train_proxies' default
# 1e-3; the much narrower small one at SMALL_PROXY_LR (at 1e-3 it was still losing 0.04 of
# held-out loss per 40-step round after 700 steps: slow, not converged)
SMALL_PROXY_LR = 5e-3

EPOCHS = 8.0  # passes over an arm's kept data (budget "epochs")
CURVE = (0.5, 1.0, 2.0)  # full data's learning curve, in multiples of EPOCHS
BATCH = 16
LR = 2e-3
VISION_LR_RATIO = 0.02


def benchmark_model(manifest: Any, out_dir: str, seed: int, pairs_dir: str, pairs: int = PRETRAIN_PAIRS,
                    steps: int = PRETRAIN_STEPS) -> str:
    """Build, pretrain, save and return the directory of the NVILA all arms of ``seed`` start from.
    The tokenizer is trained on ``manifest``'s captions (pass the full pool's, so no arm's
    vocabulary depends on its selection); the tower pretrains on ``pairs_dir``'s pairs
    (``<pairs_dir>/pretrain_pairs``, written by ``build_sets``)."""
    from training_hooks.bootstrap import init_pretrained_model

    init_pretrained_model(manifest, out_dir, pairs_dir, pairs=pairs, steps=steps, seed=seed, pairs_seed=seed,
                          objective="words",
                          image_mode=IMAGE_MODE, prompts=("Describe the image.", "What is in this picture?", "Write a short caption."))
    return out_dir


def arm_steps(budget: str, kept: int, full_kept: int, epochs: float = EPOCHS) -> int:
    """Optimizer steps of an arm that kept ``kept`` samples (full data: ``full_kept``)."""
    if budget not in ("epochs", "steps"):
        raise ValueError(f"unknown budget {budget!r}: epochs or steps")
    return max(1, math.ceil(epochs * (kept if budget == "epochs" else full_kept) / BATCH))


def training_recipe(init: str, output: str, seed: int, steps: int) -> dict[str, Any]:
    """The ``curate train`` recipe of one arm: ``steps`` (``arm_steps``), all else the same for every arm."""
    return {"init": init, "output": output, "seed": seed, "ray": {"enabled": False},
            "defaults": {"batch_size": BATCH, "max_length": 256, "save_every": steps, "warmup_steps": min(20, max(1, steps // 10))},
            "stages": {"image_sft": {"steps": steps, "lr": LR, "vision_lr_ratio": VISION_LR_RATIO}}}
