"""Image-text pairs read and decoded once, for the vision tower's caption-word pretraining.

Reading 20000 pairs from their shards and decoding each image to the tower's tile takes ~19 CPU
s on one thread (the GIL holds it there), and the pretraining waited for it. The pairs depend
on their seed and count only, so whoever synthesizes them (the demo's pairs process, beside the
filter and the proxies) can read them once more and keep what the pretraining reads: each
sample's caption, its read error, and its image at the tile size as the uint8 pixels PIL's resize
gives (``views_<tile>px.npz`` beside the shards). ``load`` turns them back into what reading and
decoding give, bit for bit: ``model.image_processing.to_tensor`` normalizes the same pixels with
the same float arithmetic. The file names the shards it was made from (name, size, modification
time); shards that differ make ``load`` answer None, and the caller reads the shards instead.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch


def path_for(shards: str, tile: int) -> str:
    return os.path.join(shards, f"views_{tile}px.npz")


def _fingerprint(urls: Sequence[str]) -> str:
    return json.dumps([[os.path.basename(u), os.stat(u).st_size, os.stat(u).st_mtime_ns] for u in urls])


def write(shards: str, tile: int) -> str:
    """Read and decode every pair of the shards in ``shards`` (a folder) once; the file written."""
    from curation.data.shards import list_shards, read_shard
    from model.image_processing import load_image

    from PIL import Image

    urls = list_shards(shards)
    captions, errors, bad, pixels = [], [], [], np.zeros((0, tile, tile, 3), np.uint8)
    rows = []
    for url in urls:
        for s in read_shard(url, kind="pair"):
            captions.append(s.caption or "")
            errors.append(s.error is not None)
            why = ""
            if s.error is None:
                try:
                    rows.append(np.asarray(load_image(s.image).convert("RGB").resize((tile, tile), Image.BICUBIC)))
                except ValueError as e:  # as load_pairs labels it
                    why = "!" + str(e)[:60]
                    rows.append(np.zeros((tile, tile, 3), np.uint8))
            else:
                rows.append(np.zeros((tile, tile, 3), np.uint8))
            bad.append(why)
    if rows:
        pixels = np.stack(rows)
    path = path_for(shards, tile)
    tmp = path + ".part.npz"
    np.savez(tmp, pixels=pixels, captions=np.array(captions, dtype=object).astype(str),
             unreadable=np.array(errors, bool), bad_media=np.array(bad, dtype=object).astype(str),
             shards=np.array(_fingerprint(urls)))
    os.replace(tmp, path)
    return path


def fresh(shards: str, tile: int) -> bool:
    """Whether ``shards`` (a folder) has its pairs decoded at ``tile`` by ``write`` since they were last written."""
    from curation.data.shards import list_shards

    path = path_for(shards, tile) if os.path.isdir(shards) else ""
    if not path or not os.path.isfile(path):
        return False
    with np.load(path) as z:
        return str(z["shards"]) == _fingerprint(list_shards(shards))


def load(shards: str, tile: int) -> dict[str, Any] | None:
    """What ``write`` kept for ``shards``, the views normalized as the tower sees them ((N, 3, t, t)
    float32); None when there is no such file or the shards changed since."""
    from model.image_processing import MEAN, STD

    if not fresh(shards, tile):
        return None
    with np.load(path_for(shards, tile)) as z:
        arr = torch.from_numpy(z["pixels"].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        views = (arr - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        return {"views": views, "captions": z["captions"].tolist(), "unreadable": z["unreadable"].tolist(),
                "bad_media": z["bad_media"].tolist()}
