"""NVILA's efficient fine-tuning as stage options: LayerNorm-only tuning of the vision tower and
LoRA on the LLM.

- ``vision_tune: layernorm``: of the tower, only its LayerNorms train (NVILA: about LoRA's
  quality at a quarter less time); the rest of the tower stays frozen.
- ``lora: {r, alpha, dropout, targets}``: the LLM's base weights freeze and low-rank adapters
  (``peft``) train on the named linear layers. The adapters are merged into the base weights
  before the stage's ``final/`` is written, so checkpoints stay plain NVILA directories that
  load without ``peft``. Mid-stage checkpoints hold the adapters as they are, so a resumed
  stage rebuilds the same adapters and continues.
"""

from __future__ import annotations

from typing import Any

from torch import nn

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def layernorm_only(tower: nn.Module) -> None:
    for p in tower.parameters():
        p.requires_grad_(False)
    for m in tower.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters():
                p.requires_grad_(True)


def apply_lora(model: Any, lora: dict[str, Any]) -> None:
    """Wrap ``model.llm`` with LoRA adapters (base weights frozen, adapters trainable)."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.get("targets") or LORA_TARGETS)
    names = {n.rsplit(".", 1)[-1] for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"lora targets {unknown} are not linear layers of the LLM (it has {sorted(names)})")
    cfg = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora.get("alpha", 2 * int(lora["r"]))),
                     lora_dropout=float(lora.get("dropout", 0.0)), target_modules=targets, bias="none")
    model.llm = get_peft_model(model.llm, cfg)


def has_lora(model: Any) -> bool:
    return hasattr(model.llm, "merge_and_unload") and hasattr(model.llm, "peft_config")


def merge_lora(model: Any) -> bool:
    """Fold the adapters into the base weights and drop ``peft``'s wrapper; False if none."""
    if not has_lora(model):
        return False
    model.llm = model.llm.merge_and_unload()
    return True


def trainable_counts(model: Any) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in model.module_groups().items()}


def apply_efficient(model: Any, vision_tune: str, lora: dict[str, Any] | None) -> dict[str, int]:
    """After the stage's freezing: LayerNorm-only tower and/or LoRA on the LLM; returns the
    trainable parameters per group."""
    if vision_tune == "layernorm":
        layernorm_only(model.vision_tower)
    if lora:
        apply_lora(model, lora)
    return trainable_counts(model)
