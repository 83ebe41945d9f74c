"""What the pruning benchmark's sets draw and say, built so that no cheap cue gives the noise away.

- **Held-out combinations**: ``HELDOUT_PAIRS`` (shape, colour) pairs, drawn per seed, that only
  the held-out set shows. Every training set (vision pretraining, trusted, calibration, pool,
  and the captions the pool's noise writes) draws outside them, so the held-out set measures
  composition: each shape and colour was seen, never together.
- **Caption styles**: the trusted, calibration, held-out and pretraining sets caption with the
  corpus' templates (``PAIR_TEMPLATES``); the pool uses ``POOL_STYLES`` for ``POOL_STYLE_SHARE``
  of its captions, clean and noisy alike, styles no model trained on trusted data has read.
- **Noise without tells**: a wrong caption gets exactly one attribute wrong (shape, colour,
  background or position) in the same styles as clean ones; word salad is made of the captions'
  own vocabulary; noise and blank images carry the same shading and grain as rendered scenes
  (``render_background``), and every image of the pool, head or tail, clean or not, has a size
  drawn from the same range.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from curation.corpus.scenes import COLORS, PAIR_TEMPLATES, POSITIONS, SHAPES, Scene, random_scene, render_background, render_scene

HELDOUT_PAIRS = 8  # (shape, colour) pairs only the held-out set shows
SIZE_RANGE = (64, 96)  # every image's sides, in pixels, whatever it is
POOL_STYLE_SHARE = 0.5
# the colour comes before the background in each (what ``curate eval`` reads a caption by)
POOL_STYLES = (
    "{shape} in {color}, sitting in the {pos} over {bg}",
    "image: {color} {shape} | backdrop: {bg} | where: {pos}",
    "Look, a {color} {shape}! The rest of the picture is {bg}.",
    "one {color} {shape} placed at the {pos}, {bg} all around it",
    "{color} colored {shape} over a plain {bg} field",
)
ATTRS = ("shape", "color", "bg", "pos")


def heldout_pairs(seed: int, n: int = HELDOUT_PAIRS) -> set[tuple[str, str]]:
    """The (shape, colour) pairs only the held-out set shows, drawn by ``seed``."""
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    rng = np.random.default_rng([seed, 31])
    return {pairs[i] for i in rng.permutation(len(pairs))[:n]}


def pair_of(scene: Scene) -> tuple[str, str]:
    return (scene.shape, scene.color)


def combo(scene: Scene) -> tuple[str, str, str]:
    return (scene.shape, scene.color, scene.bg)


def scene_outside(rng: np.random.Generator, held: set[tuple[str, str]],
                  excluded: set[tuple[str, str, str]] = frozenset()) -> Scene:  # type: ignore[assignment]
    """A random scene whose (shape, colour) is not held out and whose combination is not ``excluded``."""
    while True:
        s = random_scene(rng)
        if pair_of(s) not in held and combo(s) not in excluded:
            return s


def scene_inside(rng: np.random.Generator, held: set[tuple[str, str]]) -> Scene:
    """A random scene of a held-out (shape, colour) pair."""
    shape, color = sorted(held)[int(rng.integers(len(held)))]
    names = [c for c in COLORS if c != color]
    return Scene(shape, color, names[int(rng.integers(len(names)))], list(POSITIONS)[int(rng.integers(len(POSITIONS)))])


def caption(scene: Scene, rng: np.random.Generator, pool_styles: bool, says_pos: bool = False) -> str:
    """A caption in the corpus' templates, or (``pool_styles``) in the pool's own styles half the
    time; ``says_pos``: only styles that state the position."""
    styles = POOL_STYLES if pool_styles and rng.random() < POOL_STYLE_SHARE else PAIR_TEMPLATES
    styles = tuple(t for t in styles if "{pos}" in t or not says_pos)
    t = styles[int(rng.integers(len(styles)))]
    return t.format(color=scene.color, shape=scene.shape, bg=scene.bg, pos=scene.pos)


def one_attribute_wrong(scene: Scene, rng: np.random.Generator, held: set[tuple[str, str]]) -> tuple[Scene, str]:
    """The scene with exactly one attribute changed (never to a held-out pair, never colour == background)."""
    attr = ATTRS[int(rng.integers(len(ATTRS)))]
    values = {"shape": SHAPES, "color": tuple(COLORS), "bg": tuple(COLORS), "pos": tuple(POSITIONS)}[attr]
    while True:
        v = values[int(rng.integers(len(values)))]
        wrong = Scene(**{**{a: getattr(scene, a) for a in ATTRS}, attr: v})
        if v != getattr(scene, attr) and wrong.color != wrong.bg and pair_of(wrong) not in held:
            return wrong, attr


def _vocabulary() -> list[str]:
    words = {w for t in PAIR_TEMPLATES + POOL_STYLES for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", t))}
    words |= set(SHAPES) | set(COLORS) | {w for p in POSITIONS for w in p.split()}
    return sorted(words)


VOCABULARY = _vocabulary()


def word_salad(rng: np.random.Generator) -> str:
    """Real caption words in no order: no letter-level tell, nothing it says can be trusted."""
    return " ".join(VOCABULARY[int(i)] for i in rng.integers(len(VOCABULARY), size=int(rng.integers(6, 13))))


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    w, h = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    return w, h


def noise_image(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Smooth random colour blotches under the same shading and grain as a rendered scene."""
    gw, gh = (int(v) for v in rng.integers(3, 9, size=2))
    coarse = Image.fromarray(rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8), "RGB")
    return render_background(np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float32), w, h, rng)


def blank_image(scene: Scene, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """The scene's background, shaded and grained, with no shape on it."""
    return render_background(np.array(COLORS[scene.bg], np.float32), w, h, rng)


def clean_image(scene: Scene, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    return render_scene(scene, w, h, rng)
