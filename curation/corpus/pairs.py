"""img2dataset-style pair shards: an image, its caption and img2dataset's JSON per sample, noise injected."""

from __future__ import annotations

import io
import json
import zlib
from typing import Any, Iterator

import numpy as np
from PIL import Image

from curation.corpus.noise import assign_noise, corrupt_bytes, gibberish, truncate_bytes
from curation.corpus.scenes import COLORS, Scene, encode_image, random_scene, render_scene
from curation.corpus.spec import DatasetSpec, SynthConfig


# --------------------------------------------------------------------------- pairs


def _img2dataset_json(key: str, caption: str, image: bytes, width: int, height: int) -> dict[str, Any]:
    import hashlib

    return {
        "url": f"https://images.example.com/{key}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "exif": None,
        "sha256": hashlib.sha256(image).hexdigest(),
        "caption": caption,
    }


def gen_pair_shard(spec: DatasetSpec, cfg: SynthConfig, shard_idx: int, start: int, count: int) -> Iterator[tuple[dict, dict]]:
    """Yield (webdataset sample, ground-truth row) for one pair shard."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(spec.name.encode()), shard_idx])
    recent: list[tuple[str, Scene, bytes, str, str, int, int]] = []  # clean samples to duplicate
    labels = assign_noise(rng, spec.noise, count)
    for i in range(count):
        key = f"{shard_idx:05d}{i:04d}"
        noise = labels[i]
        if noise in ("exact_duplicate", "near_duplicate") and not recent:
            noise = "clean"
        scene = random_scene(rng)
        w, h = int(rng.integers(cfg.image_min, cfg.image_max + 1)), int(rng.integers(cfg.image_min, cfg.image_max + 1))
        fmt = "jpg" if rng.random() < 0.8 else ("png" if rng.random() < 0.5 else "webp")
        caption = scene.caption(rng)
        source_key = None
        detail: dict[str, Any] = {"shape": scene.shape, "color": scene.color, "bg": scene.bg, "pos": scene.pos}
        if noise in ("exact_duplicate", "near_duplicate"):
            source_key, scene, src_bytes, caption, fmt, w, h = recent[int(rng.integers(len(recent)))]
            detail = {"shape": scene.shape, "color": scene.color, "bg": scene.bg, "pos": scene.pos}
            if noise == "exact_duplicate":
                image = src_bytes
            else:
                # the same picture re-hosted: rescaled by up to 15 % and re-encoded at another quality
                src = Image.open(io.BytesIO(src_bytes)).convert("RGB")
                f = float(rng.uniform(0.85, 1.15))
                w, h = max(8, round(src.width * f)), max(8, round(src.height * f))
                image = encode_image(src.resize((w, h), Image.BICUBIC), fmt, quality=int(rng.integers(70, 85)))
        elif noise == "noise_image":
            image = encode_image(Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB"), fmt)
        elif noise == "blank_image":
            image = encode_image(Image.new("RGB", (w, h), COLORS[scene.bg]), fmt)
        elif noise == "tiny_image":
            w = h = int(rng.integers(6, 12))
            image = encode_image(render_scene(scene, w, h, rng), fmt)
        elif noise == "extreme_aspect":
            w, h = (int(rng.integers(400, 600)), int(rng.integers(12, 24)))
            if rng.random() < 0.5:
                w, h = h, w
            image = encode_image(render_scene(scene, w, h, rng), fmt)
        else:
            image = encode_image(render_scene(scene, w, h, rng), fmt)
        if noise == "mismatched_caption":
            other = random_scene(rng, avoid=scene)
            caption = other.caption(rng)
            detail["caption_describes"] = {"shape": other.shape, "color": other.color}
        elif noise == "empty_caption":
            caption = ""
        elif noise == "gibberish_caption":
            caption = gibberish(rng)
        if noise == "clean":
            recent.append((key, scene, image, caption, fmt, w, h))
            recent = recent[-32:]
        meta = _img2dataset_json(key, caption, image, w, h)
        if noise == "corrupt_image":
            image = corrupt_bytes(image, rng)
        elif noise == "truncated_member":
            image = truncate_bytes(image, rng)
        sample = {"__key__": key, fmt: image, "txt": caption, "json": json.dumps(meta).encode()}
        truth = {"key": key, "noise": noise, "source_key": source_key, "detail": json.dumps(detail)}
        yield sample, truth
