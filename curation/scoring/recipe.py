"""Scoring recipes: which shards, which scorers, what resources. Validated before any work.

```yaml
work: ./work                    # score store root (local folder or s3://bucket/prefix)
ray: {address: null, num_cpus: 2}
sources:
  - {shards: ./corpus/coyo_synth, kind: pair}            # dataset defaults to the folder name
  - {shards: "s3://bucket/mmc4/{00000..00099}.tar", kind: interleaved, dataset: mmc4}
scorers:
  - {name: basic, workers: 2}
  - name: clip
    params: {model: ./filters/dfn, num_frames: 4}
    batch_size: 64
    workers: 2
    num_cpus: 1
    decode_workers: 2           # threads per worker reading, decoding and preparing batches
    prefetch: 2                 # prepared batches waiting ahead of the model
```

Scorers that run on the same kind of device (CPU, or GPU: ``num_gpus > 0`` or a ``cuda`` device
param) score in one fused pass: each shard is read, hashed and decoded once for all of them.

Relative local paths are resolved against the recipe file's folder.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from curation.data import storage


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the offending field."""


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: str | list[str]
    kind: Literal["pair", "interleaved", "video", "auto"] = "auto"
    dataset: Optional[str] = None


class ScorerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, ge=1)
    workers: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_retries: int = Field(2, ge=0)
    decode_workers: int = Field(1, ge=1)  # threads per worker that read, decode and prepare batches
    prefetch: int = Field(2, ge=1)  # prepared batches waiting ahead of the model

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from scorers import scorer_names

        if v not in scorer_names():
            raise ValueError(f"unknown scorer {v!r}; known scorers: {', '.join(scorer_names())}")
        return v


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1)


class ScoreRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    work: str
    sources: list[SourceConfig] = Field(min_length=1)
    scorers: list[ScorerConfig] = Field(min_length=1)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("scorers")
    @classmethod
    def _unique(cls, v: list[ScorerConfig]) -> list[ScorerConfig]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"each scorer may appear once, got {names}")
        return v


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    if storage.is_remote(path) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))


def load_score_recipe(path_or_dict: str | dict[str, Any], base_dir: str | None = None) -> ScoreRecipe:
    """Parse and validate a recipe; resolve paths relative to its file."""
    from curation.common.yamlfile import load_yaml_model

    recipe, base = load_yaml_model(path_or_dict, ScoreRecipe, what="scoring recipe", error=RecipeError,
                                   empty_hint="give it work, sources and scorers", base_dir=base_dir)
    recipe.work = _resolve(recipe.work, base)
    for i, src in enumerate(recipe.sources):
        specs = [src.shards] if isinstance(src.shards, str) else src.shards
        src.shards = [_resolve(s, base) for s in specs]
    for i, sc in enumerate(recipe.scorers):
        for key in ("model", "pretrained"):
            v = sc.params.get(key)
            looks_local = v.startswith((".", "/", "~")) or os.sep in v or v.endswith((".pt", ".pth", ".bin", ".safetensors")) \
                if isinstance(v, str) else False
            if isinstance(v, str) and looks_local and not v.startswith("hf-hub:"):
                prefix = "local-dir:" if v.startswith("local-dir:") else ""
                sc.params[key] = prefix + _resolve(v[len(prefix):], base)
        for head in sc.params.get("heads") or []:  # clip heads' weights files (scorers/clip_heads.py)
            if isinstance(head, dict) and isinstance(head.get("path"), str):
                head["path"] = _resolve(head["path"], base)
    return recipe


def check_recipe(recipe: ScoreRecipe) -> tuple[list[Any], list[Any]]:
    """Everything that can fail before work starts: shards exist, scorers build. Returns
    (shard tasks, scorer specs)."""
    from curation.scoring.engine import ScorerSpec, ShardTask
    from curation.data.shards import dataset_of, list_shards
    from scorers import build_scorer

    tasks: list[ShardTask] = []
    for i, src in enumerate(recipe.sources):
        try:
            urls = list_shards(src.shards)
        except FileNotFoundError as e:
            raise RecipeError(f"sources[{i}].shards: {e}") from None
        if not urls:
            raise RecipeError(f"sources[{i}].shards: no .tar shards found in {src.shards}")
        for u in urls:
            tasks.append(ShardTask(u, src.dataset or dataset_of(u), src.kind))
    seen: dict[tuple[str, str], str] = {}
    from curation.data.shards import shard_name

    for t in tasks:
        k = (t.dataset, shard_name(t.url))
        if k in seen and seen[k] != t.url:
            raise RecipeError(f"sources: shards {seen[k]} and {t.url} would both be {t.dataset}/{k[1]}; "
                              f"give them different dataset names")
        seen[k] = t.url
    specs = []
    for i, sc in enumerate(recipe.scorers):
        try:
            build_scorer(sc.name, **sc.params)
        except (TypeError, ValueError, FileNotFoundError, RuntimeError) as e:
            raise RecipeError(f"scorers[{i}].params ({sc.name}): {e}") from None
        specs.append(ScorerSpec(sc.name, dict(sc.params), sc.batch_size, sc.workers, sc.num_cpus, sc.num_gpus, sc.max_retries,
                                sc.decode_workers, sc.prefetch))
    return tasks, specs
