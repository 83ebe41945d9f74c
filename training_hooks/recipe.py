"""Training recipes: which NVILA stages to run, and how.

```yaml
init: ./models/nvila-base          # NVILA directory the first stage starts from
output: ./train-out
seed: 0
precision: fp32                    # fp32 | bf16 (autocast where supported)
fp8: {enabled: false, recipe: tensorwise, emulate: null}
ray: {enabled: true, num_workers: 1, use_gpu: false, strategy: ddp}
defaults: {batch_size: 8, max_length: 512, warmup_steps: 5}
stages:                            # run in NVILA's order; omitted stages are not run
  align: {epochs: 1}
  pretrain: {epochs: 2, lr: 5.0e-5}
  image_sft: {epochs: 3, train: [projector, llm]}
  video_sft: {steps: 40}           # a fixed number of steps instead
  # efficient fine-tuning (NVILA): LayerNorm-only tower, LoRA on the LLM (merged into final/)
  # image_sft: {vision_tune: layernorm, lora: {r: 16, alpha: 32, dropout: 0.05}}
```

A stage's budget is ``epochs`` over its curated mixture (the trainer turns it into steps from
the manifest's sample counts: ``data.epoch_samples``) or, as an override, ``steps``; with both,
``steps`` wins. A budget set on a stage replaces the one in ``defaults``.

Defaults per stage follow NVILA's scripts: what each stage trains and its learning rate. Where
the vision tower trains together with the LLM its LR is ``vision_lr_ratio`` (default 1/10,
NVILA uses 5-50x lower) of the stage LR.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

STAGE_ORDER = ("align", "vision_pretrain", "pretrain", "image_sft", "video_sft")
MODULES = ("vision_tower", "projector", "llm")

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "align": {"train": ["projector"], "lr": 1e-3},
    "vision_pretrain": {"train": ["vision_tower", "projector"], "lr": 2e-5},
    "pretrain": {"train": ["projector", "llm"], "lr": 2e-5},
    "image_sft": {"train": ["vision_tower", "projector", "llm"], "lr": 1.5e-5},
    "video_sft": {"train": ["vision_tower", "projector", "llm"], "lr": 2e-5},
}


class TrainRecipeError(ValueError):
    pass


class LoraOptions(BaseModel):
    """LoRA on the LLM (``peft``): rank, scale (alpha / r), dropout, the linear layers it adapts."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], min_length=1)


class StageOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: Optional[list[str]] = None
    lr: Optional[float] = Field(None, gt=0)
    vision_lr_ratio: Optional[float] = Field(None, gt=0, le=1)
    steps: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    batch_size: Optional[int] = Field(None, ge=1)
    max_length: Optional[int] = Field(None, ge=16)
    warmup_steps: Optional[int] = Field(None, ge=0)
    weight_decay: Optional[float] = Field(None, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0)
    save_every: Optional[int] = Field(None, ge=1)
    heldout_every: Optional[int] = Field(None, ge=2)  # every n-th sample (by key hash) is held out
    heldout_samples: Optional[int] = Field(None, ge=1)
    vision_tune: Optional[Literal["full", "layernorm"]] = None  # layernorm: only the tower's LayerNorms train
    lora: Optional[LoraOptions] = None  # LoRA on the LLM, merged into final/

    @field_validator("train")
    @classmethod
    def _modules(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None:
            bad = [m for m in v if m not in MODULES]
            if bad:
                raise ValueError(f"unknown module(s) {bad}; trainable modules are {', '.join(MODULES)}")
            if not v:
                raise ValueError("a stage must train at least one module")
        return v


class FP8Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    emulate: Optional[bool] = None  # None: real FP8 where the GPU has it, emulation elsewhere
    optimizer_states: bool = False  # AdamW with FP8 moments (torchao)


class RayTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # DDP only: every rank holds the whole (small) model; rank 0 writes its checkpoints
    strategy: Literal["ddp"] = "ddp"
    address: Optional[str] = None
    cpus_per_worker: int = Field(1, ge=1)  # Ray CPUs per worker, and its torch threads


class TrainRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init: str
    output: str
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    fp8: FP8Config = Field(default_factory=FP8Config)
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    defaults: StageOverrides = Field(default_factory=StageOverrides)
    stages: dict[str, StageOverrides]
    prompts: list[str] = Field(default_factory=lambda: ["Describe the image.", "What is in this picture?",
                                                        "Write a short caption."])
    video_prompts: list[str] = Field(default_factory=lambda: ["Describe the video.", "What happens in this clip?"])

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: dict[str, StageOverrides]) -> dict[str, StageOverrides]:
        bad = [s for s in v if s not in STAGE_ORDER]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; NVILA stages are {', '.join(STAGE_ORDER)}")
        if not v:
            raise ValueError("no stages to run")
        return v


class StagePlan(BaseModel):
    """One stage, fully resolved."""

    name: str
    train: list[str]
    lr: float
    vision_lr_ratio: float = 0.1
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    max_length: int = 512
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 20
    heldout_every: int = 20  # at most; small datasets hold out a larger share (see data.stage_sources)
    heldout_samples: int = 32
    vision_tune: str = "full"
    lora: Optional[dict[str, Any]] = None
    datasets: dict[str, float] = Field(default_factory=dict)  # from the manifest

    def vision_lr(self) -> float:
        return self.lr * self.vision_lr_ratio if "llm" in self.train else self.lr


def load_train_recipe(path_or_dict: str | dict[str, Any], base_dir: str | None = None) -> TrainRecipe:
    """Parse and validate a training recipe; resolve ``init`` and ``output`` relative to its file."""
    from curation.common.yamlfile import load_yaml_model

    recipe, base = load_yaml_model(path_or_dict, TrainRecipe, what="training recipe", error=TrainRecipeError,
                                   empty_hint="give it init: (a checkpoint) and stages:", base_dir=base_dir)
    for field in ("init", "output"):
        v = os.path.expanduser(getattr(recipe, field))
        if "://" not in v and not os.path.isabs(v):
            v = os.path.normpath(os.path.join(base, v))
        setattr(recipe, field, v)
    if not os.path.isfile(os.path.join(recipe.init, "config.json")):
        raise TrainRecipeError(f"init: {recipe.init} is not an NVILA checkpoint directory (no config.json)")
    return recipe


def plan_stages(recipe: TrainRecipe, manifest: Any) -> tuple[list[StagePlan], list[str]]:
    """Resolve every requested stage against NVILA defaults, recipe overrides and the manifest's
    stage plan. Returns (stages to run, messages about stages skipped for lack of data)."""
    plans, skipped = [], []
    for name in STAGE_ORDER:
        if name not in recipe.stages:
            continue
        values: dict[str, Any] = dict(STAGE_DEFAULTS[name])
        stage = {k: v for k, v in recipe.stages[name].model_dump().items() if v is not None}
        defaults = {k: v for k, v in recipe.defaults.model_dump().items() if v is not None and k not in ("train", "lr")}
        if "steps" in stage or "epochs" in stage:  # a stage's own budget replaces the defaults' budget
            defaults = {k: v for k, v in defaults.items() if k not in ("steps", "epochs")}
        values.update(defaults)
        values.update(stage)
        mix = {ds: w for ds, w in manifest.stage_datasets(name).items() if manifest.outputs[ds].samples > 0}
        if not mix:
            skipped.append(f"stage {name}: the manifest has no curated data for it; skipped")
            continue
        if values.get("lora") and "llm" not in values["train"]:
            raise TrainRecipeError(f"stage {name}: lora adapts the LLM, but the stage trains {values['train']} "
                                   "(add llm to train:)")
        if values.get("vision_tune") == "layernorm" and "vision_tower" not in values["train"]:
            raise TrainRecipeError(f"stage {name}: vision_tune: layernorm tunes the vision tower, but the stage trains "
                                   f"{values['train']} (add vision_tower to train:)")
        if values.get("steps") is None and values.get("epochs") is None:
            values["epochs"] = 1.0  # no budget given: one pass over the stage's curated mixture
        plans.append(StagePlan(name=name, datasets=mix, **values))
    return plans, skipped
