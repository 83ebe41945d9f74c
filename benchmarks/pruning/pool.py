"""An SFT-shaped pool of image-text pairs; trusted, calibration, held-out and pretraining sets.

Built from the synthetic corpus' public pieces (scenes, rendering, the shard writer) and
``benchmarks/pruning/draw.py`` (held-out combinations, caption styles, noise without tells), in
the img2dataset layout with ``ground_truth.parquet`` beside the dataset folders, so the scorers,
``curate`` and ``training_hooks.evaluate`` read it as they read ``curate synth``'s. Every set is
drawn from the benchmark seed.

Each pair sub-dataset is mostly usable, like an SFT pool:

- **head**: a few frequent attribute combinations (``HEAD_COMBOS`` per sub-dataset), rendered
  again and again with the same shading and a few pixels of jitter: many near-identical, easy
  samples (``noise == "clean"``, ``detail.group == "head"``);
- **tail**: clean samples of every other combination, each seen rarely;
- **injected noise** (``noise_rate`` of the pool): captions with exactly one attribute wrong,
  word salad, noise and blank images (``NOISE_MIX``), none of them told apart by size, grain,
  letters or caption style (``draw.py``).

The trusted set trains the DFN filter and the DeltaLoss proxies; the calibration set (the same
distribution, never trained on) sets the CLIP threshold; the held-out set shows only (shape,
colour) pairs that no other set shows; the pretraining set feeds the vision tower's pretraining.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from benchmarks.pruning import draw as D
from curation.corpus.scenes import Scene, encode_image, render_scene
from curation.data import storage
from curation.data.writer import ShardWriter

HEAD_COMBOS = 3  # frequent (shape, colour, background) combinations per sub-dataset
HEAD_SHARE_OF_CLEAN = 0.6
# how the injected noise divides (fractions of the noise)
NOISE_MIX = {"one_attribute_wrong": 0.55, "word_salad_caption": 0.15, "noise_image": 0.15, "blank_image": 0.15}
SUB_DATASETS = (("sft_a", 0.6), ("sft_b", 0.4))  # name, share of the pool


@dataclass
class PoolSpec:
    samples: int = 1200
    noise_rate: float = 0.25
    seed: int = 0
    per_shard: int = 400
    heads: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # filled by build_sets
    held: set[tuple[str, str]] = field(default_factory=set)  # filled by build_sets


def pick_heads(rng: np.random.Generator, n: int, held: set[tuple[str, str]]) -> list[Scene]:
    heads: list[Scene] = []
    while len(heads) < n:
        s = D.scene_outside(rng, held)
        if all(D.combo(s) != D.combo(h) for h in heads):
            heads.append(s)
    return heads


def sample_labels(rng: np.random.Generator, count: int, noise_rate: float) -> list[str]:
    """Exact counts per label (head, tail, noise types), randomly placed."""
    n_noise = int(round(count * noise_rate))
    counts = {k: int(round(n_noise * v)) for k, v in NOISE_MIX.items()}
    counts["one_attribute_wrong"] += n_noise - sum(counts.values())
    n_clean = count - n_noise
    counts["head"] = int(round(n_clean * HEAD_SHARE_OF_CLEAN))
    counts["tail"] = n_clean - counts["head"]
    labels = [k for k, c in counts.items() for _ in range(c)]
    return [labels[i] for i in rng.permutation(len(labels))]


def render_pair(label: str, rng: np.random.Generator, heads: list[Scene], head_seeds: list[int],
                excluded: set[tuple[str, str, str]], held: set[tuple[str, str]]) -> tuple[bytes, str, Scene, dict[str, Any]]:
    """(jpeg bytes, caption, the scene drawn, extra ground-truth detail) for one pool sample."""
    w, h = D.image_size(rng)
    if label == "head":
        i = int(rng.integers(len(heads)))
        scene = heads[i]
        # same shading every time (fixed seed), a few pixels of jitter: near-identical renders
        im = render_scene(scene, w, h, np.random.default_rng(head_seeds[i]), jitter=tuple(rng.uniform(-3, 3, size=2)))
        return encode_image(im, "jpg"), D.caption(scene, rng, True), scene, {"group": "head"}
    scene = D.scene_outside(rng, held, excluded)
    extra: dict[str, Any] = {"group": "tail"}
    if label == "noise_image":
        im = D.noise_image(w, h, rng)
    elif label == "blank_image":
        im = D.blank_image(scene, w, h, rng)
    else:
        im = D.clean_image(scene, w, h, rng)
    said = scene
    if label == "one_attribute_wrong":
        said, extra["wrong"] = D.one_attribute_wrong(scene, rng, held)
        extra["caption_describes"] = D.combo(said) + (said.pos,)
    text = D.word_salad(rng) if label == "word_salad_caption" else D.caption(said, rng, True, extra.get("wrong") == "pos")
    return encode_image(im, "jpg"), text, scene, extra


def pool_samples(name: str, count: int, spec: PoolSpec, heads: list[Scene],
                 excluded: set[tuple[str, str, str]]) -> Iterator[tuple[dict, dict]]:
    rng = np.random.default_rng([spec.seed, sum(name.encode()), 11])
    head_seeds = [int(rng.integers(1 << 30)) for _ in heads]
    for i, label in enumerate(sample_labels(rng, count, spec.noise_rate)):
        image, text, scene, extra = render_pair(label, rng, heads, head_seeds, excluded, spec.held)
        noise = "clean" if label in ("head", "tail") else label
        yield _sample(f"{i:06d}", image, text), _truth(name, i, spec.per_shard, noise, scene, extra)


def clean_samples(name: str, count: int, seed: int, per_shard: int, held: set[tuple[str, str]],
                  inside: bool = False) -> Iterator[tuple[dict, dict]]:
    """Clean pairs in the corpus' caption templates: uniformly random scenes outside the held-out
    pairs, or (``inside``) of the held-out pairs only."""
    rng = np.random.default_rng([seed, sum(name.encode()), 23])
    for i in range(count):
        scene = D.scene_inside(rng, held) if inside else D.scene_outside(rng, held)
        w, h = D.image_size(rng)
        image = encode_image(D.clean_image(scene, w, h, rng), "jpg")
        yield _sample(f"{i:06d}", image, D.caption(scene, rng, False)), _truth(name, i, per_shard, "clean", scene,
                                                                              {"group": "tail"})


def head_seeds(name: str, spec: PoolSpec, n: int) -> list[int]:
    """The fixed shading seeds of sub-dataset ``name``'s head renders (as ``pool_samples`` draws them)."""
    rng = np.random.default_rng([spec.seed, sum(name.encode()), 11])
    return [int(rng.integers(1 << 30)) for _ in range(n)]


def source_samples(name: str, count: int, spec: PoolSpec, heads: dict[str, list[Scene]]) -> Iterator[tuple[dict, dict]]:
    """Clean pairs drawn from the pool's own sources, as trusted data from the same web sources
    would be: each sub-dataset by its share, its head combinations (the same near-identical
    renders) at the pool's head share of clean data, its tail otherwise; captioned as the pool
    captions its clean samples (its own styles at ``POOL_STYLE_SHARE``: the sources' styles,
    clean and noisy alike, so they tell nothing about noise), never a held-out pair. Nothing of
    the injected noise: no proxy learns what the noise looks like. (The filter's trusted set
    keeps the corpus' templates only.)"""
    rng = np.random.default_rng([spec.seed, sum(name.encode()), 29])
    seeds = {ds: head_seeds(ds, spec, len(heads[ds])) for ds, _ in SUB_DATASETS}
    names, shares = zip(*SUB_DATASETS)
    for i in range(count):
        ds = names[int(rng.choice(len(names), p=np.array(shares) / sum(shares)))]
        w, h = D.image_size(rng)
        if rng.random() < HEAD_SHARE_OF_CLEAN:
            j = int(rng.integers(len(heads[ds])))
            scene, group = heads[ds][j], "head"
            im = render_scene(scene, w, h, np.random.default_rng(seeds[ds][j]), jitter=tuple(rng.uniform(-3, 3, size=2)))
        else:
            scene, group = D.scene_outside(rng, spec.held, {D.combo(s) for s in heads[ds]}), "tail"
            im = D.clean_image(scene, w, h, rng)
        yield (_sample(f"{i:06d}", encode_image(im, "jpg"), D.caption(scene, rng, True)),
               _truth(name, i, spec.per_shard, "clean", scene, {"group": group, "source": ds}))


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


def build_sets(root: str, spec: PoolSpec, trusted: int = 400, calib: int = 150, heldout: int = 150,
               pretrain: int = 0, proxy_trusted: int = 0) -> dict[str, Any]:
    """Write ``<root>/pool`` (the sub-datasets), ``<root>/trusted``, ``<root>/calib``,
    ``<root>/heldout``, (``pretrain`` > 0) ``<root>/pretrain/pretrain_pairs`` and
    (``proxy_trusted`` > 0) ``<root>/proxy_trusted``: clean pairs of the pool's sources
    (``source_samples``) for the DeltaLoss proxies."""
    spec.held = D.heldout_pairs(spec.seed)
    rng = np.random.default_rng([spec.seed, 5])
    heads = {name: pick_heads(rng, HEAD_COMBOS, spec.held) for name, _ in SUB_DATASETS}
    spec.heads = {k: [D.combo(s) for s in v] for k, v in heads.items()}
    sizes = {name: int(round(spec.samples * share)) for name, share in SUB_DATASETS}
    truth = write_corpus(f"{root}/pool", {name: pool_samples(name, n, spec, heads[name], {D.combo(s) for s in heads[name]})
                                          for name, n in sizes.items()}, spec.per_shard)
    seed, per = spec.seed, spec.per_shard
    out = {"pool": {n: f"{root}/pool/{n}" for n in sizes}, "truth": truth, "heads": spec.heads, "held": sorted(spec.held)}
    for name, n, s, inside in (("trusted", trusted, 1, False), ("calib", calib, 3, False), ("heldout", heldout, 2, True),
                               ("pretrain_pairs", pretrain, 4, False)):
        if n:
            folder, p = ("pretrain", 1000) if name == "pretrain_pairs" else (name, per)
            write_corpus(f"{root}/{folder}", {name: clean_samples(name, n, seed * 10 + s, p, spec.held, inside)}, p)
            out[name] = f"{root}/{folder}/{name}"
    if proxy_trusted:
        write_corpus(f"{root}/proxy_trusted", {"proxy_trusted": source_samples("proxy_trusted", proxy_trusted, spec, heads)},
                     per)
        out["proxy_trusted"] = f"{root}/proxy_trusted/proxy_trusted"
    return out


def describe(truth: list[dict]) -> dict[str, dict[str, int]]:
    """Samples per dataset and label (head, tail, noise types)."""
    out: dict[str, dict[str, int]] = {}
    for r in truth:
        label = r["noise"] if r["noise"] != "clean" else json.loads(r["detail"])["group"]
        d = out.setdefault(r["dataset"], {})
        d[label] = d.get(label, 0) + 1
    return out

