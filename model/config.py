"""NVILA configuration: a vision tower, a projector, an LLM, and how media becomes tokens."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

PROJECTORS = ("mlp_downsample_2x2", "mlp_downsample_3x3", "linear")
IMAGE_MODES = ("dynamic_s2", "dynamic", "resize")

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
SEP_TOKEN = "<vila/sep>"  # follows each pooled video frame
MEDIA_TOKENS = (IMAGE_TOKEN, VIDEO_TOKEN, SEP_TOKEN)


class ConfigError(ValueError):
    pass


@dataclass
class NVILAConfig:
    """Everything needed to build the model (weights aside).

    ``vision_config`` / ``llm_config`` are the ``to_dict()`` of a ``SiglipVisionConfig`` and a
    ``Qwen2Config``; ``vision_path`` / ``llm_path`` name local directories to load them from
    instead (with their weights, when building from components).
    """

    vision_config: Optional[dict[str, Any]] = None
    llm_config: Optional[dict[str, Any]] = None
    vision_path: Optional[str] = None
    llm_path: Optional[str] = None
    vision_feature_layer: int = -2  # SigLIP has no CLS token: all patch tokens of this layer
    projector_type: str = "mlp_downsample_2x2"
    image_mode: str = "dynamic_s2"
    s2_scales: list[int] = field(default_factory=lambda: [448, 896, 1344])
    max_tiles: int = 12
    video_num_frames: int = 8
    video_pool_size: int = 8  # frames averaged into one (8 -> 1)
    # ids of <image>, <vila/video>, <vila/sep> in the tokenizer (set when a tokenizer is attached)
    image_token_id: Optional[int] = None
    video_token_id: Optional[int] = None
    sep_token_id: Optional[int] = None
    model_type: str = "nvila"

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes
    @property
    def tile_size(self) -> int:
        return int(self.vision()["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision()["patch_size"])

    @property
    def vision_hidden(self) -> int:
        return int(self.vision()["hidden_size"])

    @property
    def llm_hidden(self) -> int:
        return int(self.llm()["hidden_size"])

    @property
    def num_scales(self) -> int:
        return len(self.s2_scales) if self.image_mode == "dynamic_s2" else 1

    def vision(self) -> dict[str, Any]:
        if self.vision_config is not None:
            return self.vision_config
        if self.vision_path:
            return _read_json(os.path.join(self.vision_path, "config.json"), "vision_config")
        raise ConfigError("NVILAConfig needs vision_config or vision_path")

    def llm(self) -> dict[str, Any]:
        if self.llm_config is not None:
            return self.llm_config
        if self.llm_path:
            return _read_json(os.path.join(self.llm_path, "config.json"), "text_config")
        raise ConfigError("NVILAConfig needs llm_config or llm_path")

    def validate(self) -> None:
        if self.projector_type not in PROJECTORS:
            raise ConfigError(f"unknown projector_type {self.projector_type!r}; expected one of {', '.join(PROJECTORS)}")
        if self.image_mode not in IMAGE_MODES:
            raise ConfigError(f"unknown image_mode {self.image_mode!r}; expected one of {', '.join(IMAGE_MODES)}")
        if self.vision_config is None and not self.vision_path:
            raise ConfigError("NVILAConfig needs vision_config or vision_path")
        if self.llm_config is None and not self.llm_path:
            raise ConfigError("NVILAConfig needs llm_config or llm_path")
        t, p = self.tile_size, self.patch_size
        if t % p:
            raise ConfigError(f"tile size {t} is not divisible by the patch size {p}")
        if self.image_mode == "dynamic_s2":
            if not self.s2_scales or sorted(self.s2_scales) != list(self.s2_scales):
                raise ConfigError(f"s2_scales must be increasing, got {self.s2_scales}")
            for s in self.s2_scales:
                if s % t:
                    raise ConfigError(f"s2 scale {s} is not a multiple of the tile size {t}")
            if self.s2_scales[0] != t:
                # VILA counts every scale's tiles in units of the first scale
                raise ConfigError(f"the first s2 scale must be the tile size {t}, got {self.s2_scales[0]}")
            need = (self.s2_scales[-1] // t) ** 2
            if self.max_tiles < need:
                raise ConfigError(f"max_tiles {self.max_tiles} is below the {need} tiles dynamic_s2 uses at least at "
                                  f"its last scale {self.s2_scales[-1]} (({self.s2_scales[-1]} // {t})^2)")
        if self.max_tiles < 1:
            raise ConfigError("max_tiles must be >= 1")
        if self.video_pool_size < 1 or self.video_num_frames < 1:
            raise ConfigError("video_num_frames and video_pool_size must be >= 1")

    # ---- (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NVILAConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"unknown NVILA config fields: {sorted(unknown)}")
        return cls(**known)

    @classmethod
    def load(cls, path: str) -> "NVILAConfig":
        return cls.from_dict(_read_json(path, "NVILA config"))


def _read_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: {path} not found")
    with open(path) as f:
        d = json.load(f)
    # an LLM directory saved by a multimodal model may nest the text config
    return d.get("text_config", d) if what == "text_config" else d
