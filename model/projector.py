"""Multimodal projectors: vision feature maps -> LLM embeddings.

``mlp_downsample_2x2``: zero-pad to even size, fold every 2x2 patch neighbourhood into the
channels (a 32x32 map of C channels becomes 16x16 of 4C), then LayerNorm and a 2-layer MLP
with GELU. ``mlp_downsample_3x3``: zero-pad to a multiple of 3 (32 -> 33: 11x11 of 9C), then
LN, Linear 9C->3C, GELU, LN, Linear 3C->D, GELU, Linear D->D. ``linear``: one Linear per patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def space_to_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, ceil(H/k), ceil(W/k), k*k*C), zero-padding H and W up to multiples of k."""
    b, h, w, c = x.shape
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    h, w = h + ph, w + pw
    x = x.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // k, w // k, k * k * c)


class LinearProjector(nn.Module):
    def __init__(self, c_in: int, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(c_in, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample2x2Projector(nn.Module):
    def __init__(self, c_in: int, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * c_in)
        self.fc1 = nn.Linear(4 * c_in, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(space_to_channel(x, 2))
        return self.fc2(F.gelu(self.fc1(x)))


class Downsample3x3Projector(nn.Module):
    def __init__(self, c_in: int, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(9 * c_in)
        self.fc1 = nn.Linear(9 * c_in, 3 * c_in)
        self.norm2 = nn.LayerNorm(3 * c_in)
        self.fc2 = nn.Linear(3 * c_in, d)
        self.fc3 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(space_to_channel(x, 3))
        x = self.norm2(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(self.fc2(x)))


PROJECTOR_CLASSES = {
    "linear": LinearProjector,
    "mlp_downsample_2x2": Downsample2x2Projector,
    "mlp_downsample_3x3": Downsample3x3Projector,
}


def build_projector(kind: str, c_in: int, d: int) -> nn.Module:
    if kind not in PROJECTOR_CLASSES:
        raise ValueError(f"unknown projector {kind!r}; expected one of {', '.join(PROJECTOR_CLASSES)}")
    return PROJECTOR_CLASSES[kind](c_in, d)
