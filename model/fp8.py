"""FP8 training with torchao: convert the trainable linear layers to ``Float8Linear``.

Recipes: ``tensorwise`` (one scale per tensor; e4m3 forward, e5m2 gradients) and ``rowwise``
(one scale per row). On GPUs of compute capability >= 8.9 (Ada, Hopper, Blackwell) the matmuls
run in FP8; elsewhere torchao's emulation reproduces the same quantization numerics in higher
precision, so the FP8 path is tested on any CPU. Layers whose dimensions are not multiples of
16 (FP8 GEMM constraint), the LM head, and frozen layers stay in full precision.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

RECIPES = ("tensorwise", "rowwise")


class FP8UnsupportedError(RuntimeError):
    pass


def fp8_hardware() -> tuple[bool, str]:
    """(real FP8 matmuls available, description)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) >= (8, 9):
        return True, f"{name} (compute capability {major}.{minor})"
    return False, f"{name} has compute capability {major}.{minor}; FP8 needs >= 8.9"


def _filter(skip_names: Iterable[str]):
    skip = tuple(skip_names)

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(fqn == s or fqn.endswith("." + s) for s in skip):
            return False
        if module.in_features % 16 or module.out_features % 16:
            return False
        return module.weight.requires_grad

    return keep


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", *, emulate: bool | None = None,
                   skip: Iterable[str] = ("lm_head",)) -> dict[str, Any]:
    """Swap eligible ``nn.Linear`` layers of ``model`` for torchao ``Float8Linear`` in place.

    ``emulate=None`` picks real FP8 when the hardware has it and emulation otherwise;
    ``emulate=False`` on hardware without FP8 is refused with the reason.
    Returns a summary: recipe, emulated, converted and skipped layer names.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    has_fp8, why = fp8_hardware()
    if emulate is False and not has_fp8:
        raise FP8UnsupportedError(f"real FP8 ({recipe}) was asked for but this machine cannot run it: {why}. "
                                  f"Use emulate=True to run torchao's emulation instead.")
    emulate = (not has_fp8) if emulate is None else emulate
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    keep = _filter(skip)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [n for n, m in linears.items() if keep(m, n)]
    convert_to_float8_training(model, module_filter_fn=keep, config=config)
    return {"recipe": recipe, "emulated": emulate, "hardware": why, "converted": chosen,
            "skipped": [n for n in linears if n not in chosen]}


def fp8_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0, **kw: Any):
    """AdamW whose two moment buffers are stored in FP8 (torchao low-bit optimizer), for memory."""
    from torchao.optim import AdamWFp8

    return AdamWFp8(params, lr=lr, weight_decay=weight_decay, **kw)


def sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - other|^2)."""
    ref = reference.detach().double()
    noise = (ref - other.detach().double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-30)))
