"""Turning images and videos into vision-tower tiles, and counting the tokens they become.

- ``resize``: one square tile.
- ``dynamic`` (NVILA-Lite, InternVL style): the image is resized to the tiling closest to its
  aspect ratio with at most ``max_tiles`` tiles and cut into tiles, plus a thumbnail tile
  when there is more than one; each tile is projected on its own.
- ``dynamic_s2`` (NVILA, VILA's ``dynamic_s2_preprocess``): every scale but the last is resized
  square and cut into ``(scale // tile)^2`` tiles; the last scale's grid is chosen among the
  grids with at least ``(s2_scales[-1] // tile)^2`` and at most ``max_tiles`` tiles, by the
  absolute difference of the aspect ratios ``width / height`` and ``cols / rows`` (ties: see
  ``s2_last_grid``). The tiles' feature maps are stitched back per scale, resized to the last
  scale's map and concatenated on channels; the projector then runs on each last-scale tile
  of that map, so an image becomes ``rows * cols`` projected tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# SigLIP's preprocessing: resize, scale to [0, 1], normalize with mean = std = 0.5
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass
class ImageLayout:
    """How one image's tiles are arranged: one (rows, cols) grid per scale, in tile order."""

    grids: list[tuple[int, int]]
    thumbnail: bool = False  # dynamic mode: a last, extra square tile of the whole image

    @property
    def num_tiles(self) -> int:
        return sum(r * c for r, c in self.grids) + int(self.thumbnail)


def closest_tiling(width: int, height: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """``dynamic`` mode (NVILA-Lite): (rows, cols) with rows * cols <= max_tiles whose aspect
    ratio is closest to the image's (compared on the log scale).

    Ties (same ratio, e.g. 1x2 and 2x4) go to more tiles only while the image has at least
    half the pixels of the tiled canvas, so small images are not blown up.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    target = math.log(width / height)
    best, best_key = (1, 1), None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            diff = abs(math.log(cols / rows) - target)
            big_enough = width * height >= 0.5 * (cols * tile) * (rows * tile)
            key = (round(diff, 9), 0 if big_enough else 1, -(rows * cols) if big_enough else rows * cols)
            if best_key is None or key < best_key:
                best, best_key = (rows, cols), key
    return best


def s2_candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with ``min_tiles <= cols * rows <= max_tiles``, in the order VILA
    tries them: built as a Python set and sorted by tile count. The sort is stable, so grids
    with the same count keep the set's iteration order, which is fixed for small-int tuples;
    building the set the same way keeps tie-breaks identical to VILA's."""
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def s2_last_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of Dynamic-S2's last scale, as VILA chooses it (InternVL's rule).

    Each candidate is compared by ``abs(width / height - cols / rows)``; a strictly smaller
    difference wins; on an exact tie the later candidate (more tiles) wins when the image's area
    exceeds half the tiled canvas, ``0.5 * tile^2 * cols * rows``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if min_tiles > max_tiles:
        raise ValueError(f"dynamic_s2 needs at least {min_tiles} tiles at its last scale but max_tiles is {max_tiles}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in s2_candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def plan_image(width: int, height: int, mode: str, tile: int, scales: list[int], max_tiles: int) -> ImageLayout:
    if mode == "resize":
        return ImageLayout([(1, 1)])
    if mode == "dynamic":
        rows, cols = closest_tiling(width, height, max_tiles, tile)
        return ImageLayout([(rows, cols)], thumbnail=rows * cols > 1)
    if mode == "dynamic_s2":
        grids = [(s // tile, s // tile) for s in scales[:-1]]
        return ImageLayout(grids + [s2_last_grid(width, height, tile, (scales[-1] // tile) ** 2, max_tiles)])
    raise ValueError(f"unknown image mode {mode!r}")


def to_tensor(img, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> normalized float tensor (3, H, W) at ``size`` = (width, height)."""
    from PIL import Image

    img = img.convert("RGB").resize(size, Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (arr - mean) / std


def cut_tiles(x: torch.Tensor, rows: int, cols: int, tile: int) -> torch.Tensor:
    """(3, rows*tile, cols*tile) -> (rows*cols, 3, tile, tile), row-major."""
    c = x.shape[0]
    x = x.view(c, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
    return x.reshape(rows * cols, c, tile, tile)


def image_to_tiles(img, mode: str, tile: int, scales: list[int], max_tiles: int) -> tuple[torch.Tensor, ImageLayout]:
    layout = plan_image(img.width, img.height, mode, tile, scales, max_tiles)
    tiles = []
    for rows, cols in layout.grids:
        tiles.append(cut_tiles(to_tensor(img, (cols * tile, rows * tile)), rows, cols, tile))
    if layout.thumbnail:
        tiles.append(to_tensor(img, (tile, tile))[None])
    return torch.cat(tiles), layout


def load_image(data) -> "object":
    """bytes / path / PIL image -> PIL image, with a clear error for undecodable data."""
    import io

    from PIL import Image, UnidentifiedImageError

    if hasattr(data, "convert"):
        return data
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"image cannot be decoded: {e}") from None


def decode_video(data: bytes) -> list:
    """Every frame of a clip (bytes) as an RGB PIL image, in order; ValueError if PyAV cannot decode it."""
    import io

    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            return [f.to_image() for f in c.decode(video=0)]
    except Exception as e:  # noqa: BLE001 - PyAV raises many types
        raise ValueError(f"video cannot be decoded: {e}") from None


def video_frames(data, num_frames: int) -> list:
    """Decode a clip (bytes) and sample ``num_frames`` frames evenly (repeat the last if short)."""
    frames = [load_image(f) for f in data] if isinstance(data, (list, tuple)) else decode_video(data)
    if not frames:
        raise ValueError("video has no frames")
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [frames[i] for i in idx]


# --------------------------------------------------------------------------- token counts


def projector_grid(h: int, w: int, projector: str) -> tuple[int, int]:
    if projector == "mlp_downsample_2x2":
        return (h + 1) // 2, (w + 1) // 2
    if projector == "mlp_downsample_3x3":
        return (h + 2) // 3, (w + 2) // 3
    return h, w


def image_token_count(width: int, height: int, *, mode: str, tile: int, patch: int, scales: list[int],
                      max_tiles: int, projector: str) -> int:
    """How many LLM tokens one image becomes."""
    layout = plan_image(width, height, mode, tile, scales, max_tiles)
    return layout_token_count(layout, mode=mode, tile=tile, patch=patch, projector=projector)


def layout_token_count(layout: ImageLayout, *, mode: str, tile: int, patch: int, projector: str) -> int:
    """How many LLM tokens an image with this tile layout becomes.

    Every tile (in ``dynamic_s2``: every tile of the last scale, after the scales are merged;
    in ``dynamic``: the thumbnail too) is projected on its own, as VILA does."""
    p = tile // patch
    gh, gw = projector_grid(p, p, projector)
    if mode == "dynamic_s2":
        rows, cols = layout.grids[-1]
        return rows * cols * gh * gw
    return layout.num_tiles * gh * gw


def video_token_count(num_frames: int, pool: int, *, tile: int, patch: int, projector: str) -> int:
    p = tile // patch
    gh, gw = projector_grid(p, p, projector)
    pooled = math.ceil(num_frames / pool)
    return pooled * (gh * gw + 1)  # + one separator after each pooled frame
