"""MMC4-style document shards: sentences, images matched to sentences, a similarity matrix; noise injected."""

from __future__ import annotations

import json
import zlib
from typing import Any, Iterator

import numpy as np
from PIL import Image

from curation.corpus.noise import assign_noise, corrupt_bytes, gibberish, with_exact_duplicates
from curation.corpus.scenes import FILLER_SENTENCES, Scene, encode_image, random_scene, render_scene
from curation.corpus.spec import DatasetSpec, SynthConfig


def _sentences(rng: np.random.Generator, scenes: list[Scene], noise: str) -> tuple[list[str], list[int]]:
    """Fillers interleaved with one descriptive sentence per image; (sentences, index of each image's)."""
    fillers = list(rng.choice(len(FILLER_SENTENCES), size=int(rng.integers(1, 4)), replace=False))
    text_list: list[str] = []
    matched: list[int] = []
    for sc in scenes:
        if fillers and rng.random() < 0.6:
            text_list.append(FILLER_SENTENCES[fillers.pop()])
        matched.append(len(text_list))
        text_list.append(sc.sentence())
    text_list.extend(FILLER_SENTENCES[f] for f in fillers)
    if noise == "gibberish_text":
        text_list = [gibberish(rng, int(rng.integers(4, 10))) + "." for _ in text_list]
    return text_list, matched


def _images(rng: np.random.Generator, cfg: SynthConfig, drawn: list[Scene], matched: list[int]
            ) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
    """One image per scene, each matched to its sentence: (members, image_info)."""
    images: list[tuple[str, bytes]] = []
    info: list[dict[str, Any]] = []
    for j, sc in enumerate(drawn):
        side = int(rng.integers(cfg.image_min, cfg.image_max + 1))
        data = encode_image(render_scene(sc, side, side, rng), "jpg")
        name = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}{j:02d}.jpg"
        images.append((name, data))
        info.append({"image_name": name, "raw_url": f"https://web.example.com/img/{name}", "matched_text_index": matched[j]})
    return images, info


def _add_distractors(rng: np.random.Generator, cfg: SynthConfig, images: list[tuple[str, bytes]],
                     info: list[dict[str, Any]], n_sentences: int) -> list[str]:
    """Insert 1-2 images no sentence talks about (noise, or an unrelated shape: an ad, a logo);
    MMC4 assigns every image to its best sentence, distractors too. Returns their names."""
    distractors = []
    for j in range(int(rng.integers(1, 3))):
        side = int(rng.integers(cfg.image_min, cfg.image_max + 1))
        if rng.random() < 0.5:
            arr = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            data = encode_image(Image.fromarray(arr, "RGB"), "jpg")
        else:
            data = encode_image(render_scene(random_scene(rng), side, side, rng), "jpg")
        name = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}d{j}.jpg"
        at = int(rng.integers(0, len(info) + 1))
        images.insert(at, (name, data))
        info.insert(at, {"image_name": name, "raw_url": f"https://ads.example.com/{name}",
                         "matched_text_index": int(rng.integers(n_sentences))})
        distractors.append(name)
    return distractors


def _similarity(rng: np.random.Generator, info: list[dict[str, Any]], n_sentences: int, distractors: list[str],
                noise: str) -> np.ndarray:
    """A similarity matrix shaped like MMC4's (images x sentences), CLIP-like values; sets ``matched_sim``."""
    sim = rng.normal(0.12, 0.03, size=(len(info), n_sentences))
    for r, entry in enumerate(info):
        if entry["image_name"] not in distractors and noise not in ("mismatched_doc", "gibberish_text"):
            sim[r, entry["matched_text_index"]] = rng.normal(0.31, 0.03)
        entry["matched_sim"] = round(float(sim[r, entry["matched_text_index"]]), 4)
    return sim


def _document(rng: np.random.Generator, spec: DatasetSpec, cfg: SynthConfig, key: str, noise: str) -> tuple[dict, dict]:
    """One new document (not a duplicate): (webdataset sample, ground-truth detail)."""
    scenes = [random_scene(rng) for _ in range(int(rng.integers(1, 4)))]
    text_list, matched = _sentences(rng, scenes, noise)
    drawn = [random_scene(rng, avoid=sc) for sc in scenes] if noise == "mismatched_doc" else scenes
    images, info = _images(rng, cfg, drawn, matched)
    distractors = _add_distractors(rng, cfg, images, info, len(text_list)) if noise == "distractor_images" else []
    sim = _similarity(rng, info, len(text_list), distractors, noise)
    doc = {
        "url": f"https://web.example.com/page/{spec.name}/{key}",
        "text_list": text_list,
        "image_info": info,
        "similarity_matrix": [[round(float(x), 4) for x in row] for row in sim],
    }
    detail: dict[str, Any] = {"distractors": distractors, "matched_text_index": [e["matched_text_index"] for e in info]}
    if noise == "corrupt_image" and images:
        j = int(rng.integers(len(images)))
        images[j] = (images[j][0], corrupt_bytes(images[j][1], rng))
        detail["corrupt"] = images[j][0]
    return {"__key__": key, "json": json.dumps(doc).encode(), **dict(images)}, detail


def gen_interleaved_shard(spec: DatasetSpec, cfg: SynthConfig, shard_idx: int, start: int, count: int) -> Iterator[tuple[dict, dict]]:
    """Yield (webdataset sample, ground-truth row) for one document shard."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(spec.name.encode()), shard_idx])
    labels = assign_noise(rng, spec.noise, count)
    yield from with_exact_duplicates(rng, labels, shard_idx, lambda key, noise: _document(rng, spec, cfg, key, noise))
