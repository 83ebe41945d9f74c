"""The bundled NVILA model: SigLIP vision tower, Dynamic-S2, projectors, temporal pooling, Qwen2, FP8."""

from model.config import NVILAConfig
from model.nvila import IGNORE_INDEX, Media, NVILAForCausalLM

__all__ = ["NVILAConfig", "NVILAForCausalLM", "Media", "IGNORE_INDEX"]
