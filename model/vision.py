"""The SigLIP vision tower and the Dynamic-S2 merge of multi-scale feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.image_processing import ImageLayout


class VisionTower(nn.Module):
    """SigLIP (transformers) returning the patch-token map of one hidden layer.

    SigLIP has no CLS token: every token of ``feature_layer`` (default -2, the penultimate
    layer) is a patch; they are returned as a (N, P, P, C) map.
    """

    def __init__(self, model: nn.Module, feature_layer: int = -2) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        cfg = model.config
        self.grid = cfg.image_size // cfg.patch_size
        self.hidden_size = cfg.hidden_size

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        # only the layers up to ``feature_layer`` run: what the model's own forward would return
        # as ``hidden_states[feature_layer]``, without the layers after it, the post-layernorm and
        # the pooling head, whose outputs nothing reads (at -2 of 3 layers: a third of the tower)
        layers = self.model.encoder.layers
        h = self.model.embeddings(tiles.to(self.dtype))  # hidden_states[0]
        for layer in layers[: self.feature_layer % (len(layers) + 1)]:
            h = layer(h, None)
        return h.view(h.shape[0], self.grid, self.grid, h.shape[-1])  # (N, P, P, C)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def stitch(feats: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, P, P, C) tiles in row-major order -> one (rows*P, cols*P, C) map."""
    n, p, _, c = feats.shape
    return feats.view(rows, cols, p, p, c).permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, c)


def split_tiles(fmap: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*P, cols*P, C) map -> (rows*cols, P, P, C) tiles in row-major order (inverse of stitch)."""
    h, w, c = fmap.shape
    p, q = h // rows, w // cols
    return fmap.view(rows, p, cols, q, c).permute(0, 2, 1, 3, 4).reshape(rows * cols, p, q, c)


def merge_s2(feats: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    """Stitch each scale's tiles, resize every map to the last (largest) scale's map size, and
    concatenate on channels: (n_tiles, P, P, C) -> (H, W, C * n_scales).

    Resizing uses area interpolation in both directions, as VILA does (for the integer factors
    here, growing a smaller scale's map repeats each feature)."""
    maps, i = [], 0
    for rows, cols in layout.grids:
        maps.append(stitch(feats[i: i + rows * cols], rows, cols))
        i += rows * cols
    h, w = maps[-1].shape[:2]
    out = []
    for m in maps:
        if m.shape[:2] != (h, w):
            m = F.interpolate(m.permute(2, 0, 1)[None].float(), size=(h, w), mode="area")[0]
            m = m.permute(1, 2, 0).to(feats.dtype)
        out.append(m)
    return torch.cat(out, dim=-1)
