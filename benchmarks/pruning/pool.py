"""An SFT-shaped pool of image-text pairs, a trusted seed set and a long-tail held-out set.

Built from the synthetic corpus' public pieces (scenes, rendering, captions, the shard writer),
in the img2dataset layout with ``ground_truth.parquet`` beside the dataset folders, so the
scorers, ``curate`` and ``training_hooks.evaluate`` read it as they read ``curate synth``'s.

Each pair sub-dataset is mostly usable, like an SFT pool:

- **head**: a few frequent attribute combinations (``HEAD_COMBOS`` per sub-dataset), rendered
  again and again with the same shading and a few pixels of jitter: many near-identical, easy
  samples (``noise == "clean"``, ``detail.group == "head"``);
- **tail**: clean samples of every other combination, each seen rarely;
- **injected noise** (``noise_rate`` of the pool, <= 30 % by default): mismatched captions,
  captions that get the colours wrong (distracting: right shape, plausible text), gibberish
  captions, random-noise and blank images.

The held-out set holds clean tail combinations only (never a head combination of any
sub-dataset): the long tail that the head's duplicates crowd out of training.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from curation.corpus.noise import gibberish
from curation.corpus.scenes import COLORS, Scene, encode_image, random_scene, render_scene
from curation.data import storage
from curation.data.writer import ShardWriter

HEAD_COMBOS = 3  # frequent (shape, colour, background) combinations per sub-dataset
HEAD_SHARE_OF_CLEAN = 0.6
# how the injected noise divides (fractions of the noise)
NOISE_MIX = {"mismatched_caption": 0.35, "wrong_colors": 0.25, "gibberish_caption": 0.15,
             "noise_image": 0.125, "blank_image": 0.125}
SUB_DATASETS = (("sft_a", 0.6), ("sft_b", 0.4))  # name, share of the pool


@dataclass
class PoolSpec:
    samples: int = 2400
    noise_rate: float = 0.25
    seed: int = 0
    per_shard: int = 400
    heads: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # filled by build_pool


def combo(scene: Scene) -> tuple[str, str, str]:
    return (scene.shape, scene.color, scene.bg)


def pick_heads(rng: np.random.Generator, n: int) -> list[Scene]:
    heads: list[Scene] = []
    while len(heads) < n:
        s = random_scene(rng)
        if all(combo(s) != combo(h) for h in heads):
            heads.append(s)
    return heads


def tail_scene(rng: np.random.Generator, excluded: set[tuple[str, str, str]]) -> Scene:
    while True:
        s = random_scene(rng)
        if combo(s) not in excluded:
            return s


def sample_labels(rng: np.random.Generator, count: int, noise_rate: float) -> list[str]:
    """Exact counts per label (head, tail, noise types), randomly placed."""
    n_noise = int(round(count * noise_rate))
    counts = {k: int(round(n_noise * v)) for k, v in NOISE_MIX.items()}
    counts["mismatched_caption"] += n_noise - sum(counts.values())
    n_clean = count - n_noise
    counts["head"] = int(round(n_clean * HEAD_SHARE_OF_CLEAN))
    counts["tail"] = n_clean - counts["head"]
    labels = [k for k, c in counts.items() for _ in range(c)]
    return [labels[i] for i in rng.permutation(len(labels))]


def render_pair(label: str, rng: np.random.Generator, heads: list[Scene], head_seeds: list[int],
                excluded: set[tuple[str, str, str]]) -> tuple[bytes, str, Scene, dict[str, Any]]:
    """(jpeg bytes, caption, the scene drawn, extra ground-truth detail) for one pool sample."""
    if label == "head":
        i = int(rng.integers(len(heads)))
        scene, size = heads[i], 80
        # same shading every time (fixed seed), a few pixels of jitter: near-identical renders
        im = render_scene(scene, size, size, np.random.default_rng(head_seeds[i]),
                          jitter=tuple(rng.uniform(-3, 3, size=2)))
        return encode_image(im, "jpg"), scene.caption(rng), scene, {"group": "head"}
    scene = tail_scene(rng, excluded)
    w, h = (int(v) for v in rng.integers(64, 97, size=2))
    extra: dict[str, Any] = {"group": "tail"}
    if label == "noise_image":
        im = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
    elif label == "blank_image":
        im = Image.new("RGB", (w, h), COLORS[scene.bg])
    else:
        im = render_scene(scene, w, h, rng)
    caption = scene.caption(rng)
    if label == "mismatched_caption":
        other = random_scene(rng, avoid=scene)
        caption, extra["caption_describes"] = other.caption(rng), combo(other)
    elif label == "wrong_colors":  # right shape and position, wrong colours: plausible, misleading
        other = random_scene(rng, avoid=scene)
        wrong = Scene(scene.shape, other.color, other.bg if other.bg != other.color else scene.color, scene.pos)
        caption, extra["caption_describes"] = wrong.caption(rng), combo(wrong)
    elif label == "gibberish_caption":
        caption = gibberish(rng)
    return encode_image(im, "jpg"), caption, scene, extra


def pool_samples(name: str, count: int, spec: PoolSpec, heads: list[Scene],
                 excluded: set[tuple[str, str, str]]) -> Iterator[tuple[dict, dict]]:
    rng = np.random.default_rng([spec.seed, sum(name.encode()), 11])
    head_seeds = [int(rng.integers(1 << 30)) for _ in heads]
    for i, label in enumerate(sample_labels(rng, count, spec.noise_rate)):
        image, caption, scene, extra = render_pair(label, rng, heads, head_seeds, excluded)
        noise = "clean" if label in ("head", "tail") else label
        yield _sample(f"{i:06d}", image, caption), _truth(name, i, spec.per_shard, noise, scene, extra)


def clean_samples(name: str, count: int, seed: int, per_shard: int,
                  excluded: set[tuple[str, str, str]]) -> Iterator[tuple[dict, dict]]:
    """Clean pairs of uniformly random scenes outside ``excluded`` (trusted and held-out sets)."""
    rng = np.random.default_rng([seed, sum(name.encode()), 23])
    for i in range(count):
        scene = tail_scene(rng, excluded)
        w, h = (int(v) for v in rng.integers(64, 97, size=2))
        image = encode_image(render_scene(scene, w, h, rng), "jpg")
        yield _sample(f"{i:06d}", image, scene.caption(rng)), _truth(name, i, per_shard, "clean", scene, {"group": "tail"})


def _sample(key: str, image: bytes, caption: str) -> dict:
    meta = {"key": key, "caption": caption, "status": "success", "url": f"https://sft.example.com/{key}.jpg"}
    return {"__key__": key, "jpg": image, "txt": caption, "json": json.dumps(meta).encode()}


def _truth(dataset: str, i: int, per_shard: int, noise: str, scene: Scene, extra: dict[str, Any]) -> dict:
    detail = {"shape": scene.shape, "color": scene.color, "bg": scene.bg, "pos": scene.pos, **extra}
    return {"dataset": dataset, "kind": "pair", "shard": f"{i // per_shard:05d}", "key": f"{i:06d}", "noise": noise,
            "source_key": None, "detail": json.dumps(detail)}


def write_corpus(out: str, datasets: dict[str, Iterator[tuple[dict, dict]]], per_shard: int) -> list[dict]:
    """Write each dataset's samples as ``<out>/<dataset>/<shard>.tar`` and the ground truth beside."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    truth: list[dict] = []
    for name, samples in datasets.items():
        with ShardWriter(storage.join(out, name), "{index:05d}.tar", max_samples=per_shard, max_bytes=1 << 40) as w:
            for sample, row in samples:
                w.write(sample)
                truth.append(row)
            w.close()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(truth), buf)
    storage.write_bytes(storage.join(out, "ground_truth.parquet"), buf.getvalue())
    return truth


def build_sets(root: str, spec: PoolSpec, trusted: int = 400, heldout: int = 150) -> dict[str, Any]:
    """Write ``<root>/pool`` (the sub-datasets), ``<root>/trusted`` and ``<root>/heldout``."""
    rng = np.random.default_rng([spec.seed, 5])
    heads = {name: pick_heads(rng, HEAD_COMBOS) for name, _ in SUB_DATASETS}
    all_heads = {combo(s) for hs in heads.values() for s in hs}
    spec.heads = {k: [combo(s) for s in v] for k, v in heads.items()}
    sizes = {name: int(round(spec.samples * share)) for name, share in SUB_DATASETS}
    truth = write_corpus(f"{root}/pool", {name: pool_samples(name, n, spec, heads[name], {combo(s) for s in heads[name]})
                                          for name, n in sizes.items()}, spec.per_shard)
    write_corpus(f"{root}/trusted", {"trusted": clean_samples("trusted", trusted, spec.seed + 1, spec.per_shard, set())},
                 spec.per_shard)
    write_corpus(f"{root}/heldout", {"heldout": clean_samples("heldout", heldout, spec.seed + 2, spec.per_shard, all_heads)},
                 spec.per_shard)
    return {"pool": {n: f"{root}/pool/{n}" for n in sizes}, "trusted": f"{root}/trusted/trusted",
            "heldout": f"{root}/heldout/heldout", "truth": truth, "heads": spec.heads}


def describe(truth: list[dict]) -> dict[str, dict[str, int]]:
    """Samples per dataset and label (head, tail, noise types)."""
    out: dict[str, dict[str, int]] = {}
    for r in truth:
        label = r["noise"] if r["noise"] != "clean" else json.loads(r["detail"])["group"]
        d = out.setdefault(r["dataset"], {})
        d[label] = d.get(label, 0) + 1
    return out

