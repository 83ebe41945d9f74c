"""video2dataset-style clip shards: an mp4 of a shape moving, its caption and metadata; noise injected."""

from __future__ import annotations

import json
import zlib
from typing import Any, Iterator

import numpy as np

from curation.corpus.noise import assign_noise, corrupt_bytes, truncate_bytes, with_exact_duplicates
from curation.corpus.scenes import DIRECTIONS, encode_mp4, random_scene, render_clip, video_caption
from curation.corpus.spec import DatasetSpec, SynthConfig


def _clip(rng: np.random.Generator, spec: DatasetSpec, cfg: SynthConfig, key: str, noise: str) -> tuple[dict, dict]:
    """One new clip (not a duplicate): (webdataset sample, ground-truth detail)."""
    dirs = list(DIRECTIONS)
    scene = random_scene(rng)
    direction = dirs[int(rng.integers(len(dirs)))]
    caption = video_caption(scene, direction)
    detail: dict[str, Any] = {"shape": scene.shape, "color": scene.color, "bg": scene.bg, "direction": direction}
    if noise == "noise_video":
        frames = [rng.integers(0, 256, size=(cfg.video_size, cfg.video_size, 3), dtype=np.uint8) for _ in range(cfg.video_frames)]
    else:
        frames = render_clip(scene, None if noise == "static_video" else direction, cfg.video_size, cfg.video_frames, rng)
    if noise == "mismatched_caption":
        other = random_scene(rng, avoid=scene)
        other_dir = dirs[(dirs.index(direction) + 1 + int(rng.integers(len(dirs) - 1))) % len(dirs)]
        caption = video_caption(other, other_dir)
        detail["caption_describes"] = {"shape": other.shape, "color": other.color, "direction": other_dir}
    elif noise == "empty_caption":
        caption = ""
    video = encode_mp4(frames, cfg.video_fps)
    meta = {
        "url": f"https://videos.example.com/{spec.name}/{key}.mp4",
        "key": key,
        "status": "success",
        "error_message": None,
        "caption": caption,
        "duration": cfg.video_frames / cfg.video_fps,
        "video_metadata": {"streams": [{"codec_name": "h264", "width": cfg.video_size, "height": cfg.video_size,
                                        "r_frame_rate": f"{cfg.video_fps}/1", "nb_frames": str(cfg.video_frames)}]},
    }
    if noise == "corrupt_video":
        video = corrupt_bytes(video, rng)
    elif noise == "truncated_member":
        video = truncate_bytes(video, rng)
    sample = {"__key__": key, "mp4": video, "txt": caption, "json": json.dumps(meta).encode()}
    return sample, detail


def gen_video_shard(spec: DatasetSpec, cfg: SynthConfig, shard_idx: int, start: int, count: int) -> Iterator[tuple[dict, dict]]:
    """Yield (webdataset sample, ground-truth row) for one clip shard."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(spec.name.encode()), shard_idx])
    labels = assign_noise(rng, spec.noise, count)
    yield from with_exact_duplicates(rng, labels, shard_idx, lambda key, noise: _clip(rng, spec, cfg, key, noise))
