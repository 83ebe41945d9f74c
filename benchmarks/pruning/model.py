"""THE model and training budget every arm uses: the one place to switch them.

``benchmark_model`` builds the NVILA every arm starts from (one initialization per seed, the
same for every arm), ``training_recipe`` the budget (same steps, batch and learning rate for
every arm). Issue 14 changes the bundled tiny NVILA and its training budgets so that it learns
to caption held-out images; to measure with that configuration, change these two functions
(e.g. call ``training_hooks.bootstrap.init_tiny_model`` with its new defaults) and nothing else.
"""

from __future__ import annotations

from typing import Any

# The stock ``tiny`` config sees a 32 px tile in 8 px patches (16 patches); on these 64-96 px
# scenes it learns the background colour at once but the shape's colour and the shape only
# slowly. 4 px patches on one 32 px tile (``resize``) see the shape in 64 patches at the cost
# of 4x the tokens of one tile, still cheaper than dynamic_s2's several tiles.
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=4)
LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
IMAGE_MODE = "resize"

STEPS = 300
BATCH = 16
LR = 2e-3
VISION_LR_RATIO = 1.0  # the vision tower starts from random weights: it trains at the full LR


def benchmark_model(manifest: Any, out_dir: str, seed: int) -> str:
    """Build, save and return the directory of the NVILA all arms of ``seed`` start from.
    The tokenizer is trained on ``manifest``'s captions (pass the same manifest for every seed's
    arms: the full pool's, so no arm's vocabulary depends on its selection)."""
    from training_hooks.bootstrap import init_tiny_model

    return init_tiny_model(manifest, out_dir, size={"vision": VISION, "llm": LLM}, seed=seed, image_mode=IMAGE_MODE,
                           prompts=("Describe the image.", "What is in this picture?", "Write a short caption."))


def training_recipe(init: str, output: str, seed: int, steps: int = STEPS) -> dict[str, Any]:
    """The ``curate train`` recipe of one arm: the same budget for every arm."""
    return {"init": init, "output": output, "seed": seed, "ray": {"enabled": False},
            "defaults": {"batch_size": BATCH, "max_length": 256, "save_every": steps, "warmup_steps": 20},
            "stages": {"image_sft": {"steps": steps, "lr": LR, "vision_lr_ratio": VISION_LR_RATIO}}}
