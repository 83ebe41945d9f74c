"""Synthetic corpus: realistic shards of all three kinds, with known, injected noise.

No real corpus can be downloaded where this service is developed and tested, so this
module writes shards in the real layouts (img2dataset pairs with their per-shard
``.parquet`` and ``_stats.json``, MMC4 documents, video2dataset clips) whose content is
simple enough for tiny models to learn: colored shapes on colored backgrounds, captions
that describe them truthfully, and clips of a shape moving in a stated direction.

Noise is injected at configurable rates and the truth is written to
``<out>/ground_truth.parquet`` (never inside the shards), one row per sample:
``dataset, kind, shard, key, noise, source_key, detail``. ``noise`` is ``"clean"`` or
one of the ``*_NOISE`` names below.

Everything is deterministic by seed: each shard is generated from its own seed
``(seed, dataset, shard index)``, so shards can be generated in parallel and any
single shard can be regenerated alone.
"""

from __future__ import annotations

import io
import json
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from curation import io as cio
from curation.writer import ShardWriter, WrittenShard

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "pink": (250, 150, 190),
}
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
DIRECTIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "from left to right": ((0.2, 0.5), (0.8, 0.5)),
    "from right to left": ((0.8, 0.5), (0.2, 0.5)),
    "from top to bottom": ((0.5, 0.2), (0.5, 0.8)),
    "from bottom to top": ((0.5, 0.8), (0.5, 0.2)),
}
PAIR_TEMPLATES = (
    "a {color} {shape} on a {bg} background",
    "A photo of a {color} {shape} in the {pos} against a {bg} background.",
    "{color} {shape}, {bg} backdrop, {pos}",
    "a simple drawing of a {shape} colored {color} on {bg}",
    "There is a {color} {shape} in the {pos} of this {bg} picture.",
)
FILLER_SENTENCES = (
    "This page was last updated in the spring.",
    "Subscribe to our newsletter for more shapes.",
    "We have collected many drawings over the years.",
    "Thanks for reading and see you next time.",
    "Click the link below to learn more about our workshop.",
    "All pictures on this page were made by our students.",
)

PAIR_NOISE = (
    "mismatched_caption",
    "noise_image",
    "blank_image",
    "exact_duplicate",
    "near_duplicate",
    "corrupt_image",
    "truncated_member",
    "tiny_image",
    "extreme_aspect",
    "empty_caption",
    "gibberish_caption",
)
INTERLEAVED_NOISE = (
    "distractor_images",
    "mismatched_doc",
    "corrupt_image",
    "exact_duplicate",
    "gibberish_text",
)
VIDEO_NOISE = (
    "mismatched_caption",
    "static_video",
    "noise_video",
    "corrupt_video",
    "truncated_member",
    "exact_duplicate",
    "empty_caption",
)
NOISE_TYPES = {"pair": PAIR_NOISE, "interleaved": INTERLEAVED_NOISE, "video": VIDEO_NOISE}
# Noise a reader must report as an unreadable sample (the rest is readable but useless)
UNREADABLE_NOISE = {"corrupt_image", "truncated_member", "corrupt_video"}

DEFAULT_PAIR_RATES = {
    "mismatched_caption": 0.10,
    "noise_image": 0.03,
    "blank_image": 0.03,
    "exact_duplicate": 0.04,
    "near_duplicate": 0.04,
    "corrupt_image": 0.02,
    "truncated_member": 0.02,
    "tiny_image": 0.02,
    "extreme_aspect": 0.02,
    "empty_caption": 0.02,
    "gibberish_caption": 0.03,
}
DEFAULT_INTERLEAVED_RATES = {
    "distractor_images": 0.15,
    "mismatched_doc": 0.08,
    "corrupt_image": 0.04,
    "exact_duplicate": 0.04,
    "gibberish_text": 0.04,
}
DEFAULT_VIDEO_RATES = {
    "mismatched_caption": 0.12,
    "static_video": 0.06,
    "noise_video": 0.04,
    "corrupt_video": 0.03,
    "truncated_member": 0.02,
    "exact_duplicate": 0.04,
    "empty_caption": 0.03,
}


@dataclass
class DatasetSpec:
    name: str
    kind: str  # pair | interleaved | video
    samples: int
    noise: dict[str, float] = field(default_factory=dict)
    samples_per_shard: int = 256

    def __post_init__(self) -> None:
        if self.kind not in NOISE_TYPES:
            raise ValueError(f"dataset {self.name!r}: unknown kind {self.kind!r}; expected one of {', '.join(NOISE_TYPES)}")
        if self.samples < 0 or self.samples_per_shard < 1:
            raise ValueError(f"dataset {self.name!r}: samples must be >= 0 and samples_per_shard >= 1")
        unknown = set(self.noise) - set(NOISE_TYPES[self.kind])
        if unknown:
            raise ValueError(
                f"dataset {self.name!r}: unknown noise type(s) {sorted(unknown)} for kind {self.kind!r}; "
                f"known: {', '.join(NOISE_TYPES[self.kind])}"
            )
        bad = {k: v for k, v in self.noise.items() if not 0 <= v <= 1}
        if bad or sum(self.noise.values()) > 1:
            raise ValueError(f"dataset {self.name!r}: noise rates must be in [0, 1] and sum to at most 1, got {self.noise}")

    @property
    def num_shards(self) -> int:
        return (self.samples + self.samples_per_shard - 1) // self.samples_per_shard


@dataclass
class SynthConfig:
    seed: int = 0
    datasets: list[DatasetSpec] = field(default_factory=list)
    image_min: int = 64  # side length range of clean images, in pixels
    image_max: int = 112
    video_size: int = 64
    video_frames: int = 8
    video_fps: int = 8

    @classmethod
    def preset(cls, size: str = "small", seed: int = 0, noise_scale: float = 1.0) -> "SynthConfig":
        """Named sizes: ``tiny`` (tests), ``small`` (demo), ``medium``, ``large``; or an integer
        string, the number of pairs in the main pair dataset (the rest scale with it)."""
        scales = {"tiny": 48, "small": 600, "medium": 6000, "large": 60000}
        if size in scales:
            n = scales[size]
        else:
            try:
                n = int(size)
            except ValueError:
                raise ValueError(f"unknown size {size!r}: use tiny, small, medium, large or a number of pairs") from None
            if n < 1:
                raise ValueError("size must be >= 1")
        per_shard = 24 if n <= 48 else 200 if n <= 1000 else 1000

        def scaled(rates: dict[str, float]) -> dict[str, float]:
            return {k: v * noise_scale for k, v in rates.items()}

        cc3m_rates = {k: v / 2 for k, v in DEFAULT_PAIR_RATES.items()}
        return cls(
            seed=seed,
            datasets=[
                DatasetSpec("coyo_synth", "pair", n, scaled(DEFAULT_PAIR_RATES), per_shard),
                DatasetSpec("cc3m_synth", "pair", max(1, n // 2), scaled(cc3m_rates), per_shard),
                DatasetSpec("mmc4_synth", "interleaved", max(1, n // 6), scaled(DEFAULT_INTERLEAVED_RATES), max(8, per_shard // 4)),
                DatasetSpec("video_synth", "video", max(1, n // 8), scaled(DEFAULT_VIDEO_RATES), max(8, per_shard // 4)),
            ],
        )


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    bg: str
    pos: str

    def caption(self, rng: np.random.Generator) -> str:
        t = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
        return t.format(color=self.color, shape=self.shape, bg=self.bg, pos=self.pos)

    def sentence(self) -> str:
        return f"Here we drew a {self.color} {self.shape} on a {self.bg} background."


def random_scene(rng: np.random.Generator, avoid: Scene | None = None) -> Scene:
    names = list(COLORS)
    while True:
        color = names[int(rng.integers(len(names)))]
        bg = names[int(rng.integers(len(names)))]
        if bg == color:
            continue
        s = Scene(SHAPES[int(rng.integers(len(SHAPES)))], color, bg, list(POSITIONS)[int(rng.integers(len(POSITIONS)))])
        # a mismatch must differ in what the caption says: shape and color both
        if avoid is None or (s.shape != avoid.shape and s.color != avoid.color):
            return s


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -np.pi / 2 + i * np.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.35
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
            (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)


def render_scene(
    scene: Scene, width: int, height: int, rng: np.random.Generator, jitter: tuple[float, float] = (0.0, 0.0)
) -> Image.Image:
    bg = np.array(COLORS[scene.bg], dtype=np.float32)
    # low-frequency shading (like lighting in a photo) makes every image's layout its own,
    # so perceptual hashes of distinct images differ; fine grain keeps them from compressing
    # to nothing
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width), np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(-2.0, 2.0, size=2)
        field += np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + rng.uniform(0, 2 * np.pi))
    pix = bg + 24.0 * field[..., None] + rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
    im = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    fx, fy = POSITIONS[scene.pos]
    r = min(width, height) * float(rng.uniform(0.16, 0.22))
    draw_shape(d, scene.shape, fx * width + jitter[0], fy * height + jitter[1], r, COLORS[scene.color])
    return im


def encode_image(im: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        im.save(buf, format="PNG")
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def gibberish(rng: np.random.Generator, words: int = 8) -> str:
    letters = np.array(list("qwxzjkvbpgfdhlmntrs"))
    return " ".join("".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(words))


def corrupt_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """Garble the header so no decoder recognizes the format, keep the length."""
    head = bytes(rng.integers(0, 256, size=min(64, len(data)), dtype=np.uint8))
    return head + data[len(head):]


def truncate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: max(16, int(len(data) * float(rng.uniform(0.3, 0.6))))]


def assign_noise(rng: np.random.Generator, rates: dict[str, float], count: int) -> list[str]:
    """Noise labels for ``count`` samples: exact proportions per shard (largest remainder,
    random tie-breaks), randomly placed. The first sample is clean when any is, so that
    duplicates always have a clean source earlier in the shard."""
    want = {k: v * count for k, v in rates.items() if v > 0}
    n_noise = min(count, int(round(sum(want.values()))))
    counts = {k: int(np.floor(v)) for k, v in want.items()}
    rest = n_noise - sum(counts.values())
    order = sorted(want, key=lambda k: (want[k] - counts[k]) + float(rng.random()) * 1e-6, reverse=True)
    for k in order[: max(0, rest)]:
        counts[k] += 1
    labels = [k for k, c in counts.items() for _ in range(c)]
    labels += ["clean"] * (count - len(labels))
    labels = [labels[i] for i in rng.permutation(len(labels))]
    if "clean" in labels and labels and labels[0] != "clean":
        j = labels.index("clean")
        labels[0], labels[j] = labels[j], labels[0]
    return labels


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


# --------------------------------------------------------------------------- MMC4 documents


def gen_interleaved_shard(spec: DatasetSpec, cfg: SynthConfig, shard_idx: int, start: int, count: int) -> Iterator[tuple[dict, dict]]:
    rng = np.random.default_rng([cfg.seed, zlib.crc32(spec.name.encode()), shard_idx])
    recent: list[tuple[str, dict]] = []
    labels = assign_noise(rng, spec.noise, count)
    for i in range(count):
        key = f"{shard_idx:05d}{i:04d}"
        noise = labels[i]
        if noise == "exact_duplicate" and not recent:
            noise = "clean"
        if noise == "exact_duplicate":
            src_key, src = recent[int(rng.integers(len(recent)))]
            sample = {"__key__": key, **{k: v for k, v in src.items() if k != "__key__"}}
            yield sample, {"key": key, "noise": noise, "source_key": src_key, "detail": "{}"}
            continue
        n_img = int(rng.integers(1, 4))
        scenes = [random_scene(rng) for _ in range(n_img)]
        fillers = list(rng.choice(len(FILLER_SENTENCES), size=int(rng.integers(1, 4)), replace=False))
        # sentences: fillers interleaved with one descriptive sentence per image
        text_list: list[str] = []
        matched: list[int] = []
        for j, sc in enumerate(scenes):
            if fillers and rng.random() < 0.6:
                text_list.append(FILLER_SENTENCES[fillers.pop()])
            matched.append(len(text_list))
            text_list.append(sc.sentence())
        text_list.extend(FILLER_SENTENCES[f] for f in fillers)
        if noise == "gibberish_text":
            text_list = [gibberish(rng, int(rng.integers(4, 10))) + "." for _ in text_list]
        drawn = scenes
        if noise == "mismatched_doc":
            drawn = [random_scene(rng, avoid=sc) for sc in scenes]
        images: list[tuple[str, bytes]] = []
        info: list[dict[str, Any]] = []
        distractors: list[str] = []
        for j, sc in enumerate(drawn):
            side = int(rng.integers(cfg.image_min, cfg.image_max + 1))
            data = encode_image(render_scene(sc, side, side, rng), "jpg")
            name = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}{j:02d}.jpg"
            images.append((name, data))
            info.append({"image_name": name, "raw_url": f"https://web.example.com/img/{name}", "matched_text_index": matched[j]})
        if noise == "distractor_images":
            for j in range(int(rng.integers(1, 3))):
                side = int(rng.integers(cfg.image_min, cfg.image_max + 1))
                if rng.random() < 0.5:
                    arr = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
                    data = encode_image(Image.fromarray(arr, "RGB"), "jpg")
                else:  # a shape no sentence talks about (an ad, a logo)
                    data = encode_image(render_scene(random_scene(rng), side, side, rng), "jpg")
                name = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}d{j}.jpg"
                at = int(rng.integers(0, len(info) + 1))
                images.insert(at, (name, data))
                # MMC4 assigns every image to its best sentence, distractors too
                info.insert(at, {"image_name": name, "raw_url": f"https://ads.example.com/{name}", "matched_text_index": int(rng.integers(len(text_list)))})
                distractors.append(name)
        # a similarity matrix shaped like MMC4's (images x sentences), CLIP-like values
        sim = rng.normal(0.12, 0.03, size=(len(info), len(text_list)))
        for r, entry in enumerate(info):
            if entry["image_name"] not in distractors and noise not in ("mismatched_doc", "gibberish_text"):
                sim[r, entry["matched_text_index"]] = rng.normal(0.31, 0.03)
            entry["matched_sim"] = round(float(sim[r, entry["matched_text_index"]]), 4)
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
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(doc).encode()}
        for name, data in images:
            sample[name] = data
        if noise == "clean":
            recent.append((key, sample))
            recent = recent[-16:]
        yield sample, {"key": key, "noise": noise, "source_key": None, "detail": json.dumps(detail)}


# --------------------------------------------------------------------------- videos


def encode_mp4(frames: list[np.ndarray], fps: int) -> bytes:
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, mode="w", format="mp4") as container:
        # x264's SIMD paths gave different bytes for the same frames from run to run;
        # asm=0 with one thread is bit-exact (and fast enough at these sizes), which keeps
        # the corpus deterministic by seed
        stream = container.add_stream(
            "libx264", rate=fps, options={"threads": "1", "preset": "veryfast", "crf": "23", "x264-params": "asm=0"}
        )
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def render_clip(scene: Scene, direction: str | None, size: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shape moving along ``direction`` (None: it stays put)."""
    (x0, y0), (x1, y1) = DIRECTIONS[direction] if direction else ((0.5, 0.5), (0.5, 0.5))
    r = size * 0.14
    frames = []
    for t in range(n):
        a = t / max(1, n - 1)
        pix = np.array(COLORS[scene.bg], dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)
        im = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")
        draw_shape(ImageDraw.Draw(im), scene.shape, (x0 + (x1 - x0) * a) * size, (y0 + (y1 - y0) * a) * size, r, COLORS[scene.color])
        frames.append(np.asarray(im))
    return frames


def video_caption(scene: Scene, direction: str) -> str:
    return f"a {scene.color} {scene.shape} moves {direction} on a {scene.bg} background"


def gen_video_shard(spec: DatasetSpec, cfg: SynthConfig, shard_idx: int, start: int, count: int) -> Iterator[tuple[dict, dict]]:
    rng = np.random.default_rng([cfg.seed, zlib.crc32(spec.name.encode()), shard_idx])
    recent: list[tuple[str, dict]] = []
    dirs = list(DIRECTIONS)
    labels = assign_noise(rng, spec.noise, count)
    for i in range(count):
        key = f"{shard_idx:05d}{i:04d}"
        noise = labels[i]
        if noise == "exact_duplicate" and not recent:
            noise = "clean"
        if noise == "exact_duplicate":
            src_key, src = recent[int(rng.integers(len(recent)))]
            yield {"__key__": key, **{k: v for k, v in src.items() if k != "__key__"}}, {
                "key": key, "noise": noise, "source_key": src_key, "detail": "{}"}
            continue
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
        if noise == "clean":
            recent.append((key, sample))
            recent = recent[-16:]
        yield sample, {"key": key, "noise": noise, "source_key": None, "detail": json.dumps(detail)}


GENERATORS: dict[str, Callable[..., Iterator[tuple[dict, dict]]]] = {
    "pair": gen_pair_shard,
    "interleaved": gen_interleaved_shard,
    "video": gen_video_shard,
}


# --------------------------------------------------------------------------- writing


def _write_shard(args: tuple[DatasetSpec, SynthConfig, str, int, dict | None]) -> tuple[WrittenShard, list[dict]]:
    spec, cfg, out, shard_idx, storage_options = args
    start = shard_idx * spec.samples_per_shard
    count = min(spec.samples_per_shard, spec.samples - start)
    ds_url = cio.join(out, spec.name)
    truth: list[dict] = []
    t0 = time.time()
    rows = []
    writer = ShardWriter(ds_url, "{index:05d}.tar", max_samples=count, max_bytes=1 << 40, start_index=shard_idx,
                         storage_options=storage_options)
    with writer:
        for sample, gt in GENERATORS[spec.kind](spec, cfg, shard_idx, start, count):
            writer.write(sample)
            truth.append({"dataset": spec.name, "kind": spec.kind, "shard": f"{shard_idx:05d}", **gt})
            if spec.kind == "pair":
                rows.append(json.loads(sample["json"]))
    written = writer.written[0]
    if spec.kind == "pair":
        # img2dataset writes a per-shard parquet of sample metadata and a stats file beside each tar
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        cio.write_bytes(cio.join(ds_url, f"{shard_idx:05d}.parquet"), buf.getvalue(), storage_options)
        stats = {
            "count": count,
            "successes": count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": round(time.time() - t0, 3),
            "status_dict": {"success": count},
        }
        cio.write_bytes(cio.join(ds_url, f"{shard_idx:05d}_stats.json"), json.dumps(stats, indent=2).encode(), storage_options)
    return written, truth


@dataclass
class SynthResult:
    out: str
    shards: dict[str, list[WrittenShard]]
    ground_truth: str
    counts: dict[str, dict[str, int]]  # dataset -> noise -> samples

    def summary(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "ground_truth": self.ground_truth,
            "datasets": {
                name: {
                    "shards": len(shards),
                    "samples": sum(s.nsamples for s in shards),
                    "bytes": sum(s.filesize for s in shards),
                    "noise": self.counts.get(name, {}),
                }
                for name, shards in self.shards.items()
            },
        }


def synthesize(
    out: str,
    config: SynthConfig | None = None,
    *,
    workers: int = 1,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> SynthResult:
    """Write the corpus under ``out`` (a folder or ``s3://bucket/prefix``).

    Layout: ``<out>/<dataset>/<shard>.tar`` (+ ``.parquet`` and ``_stats.json`` for pairs),
    ``<out>/ground_truth.parquet`` and ``<out>/corpus.json``. ``progress(dataset, n)`` is
    called as each shard of n samples finishes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = config or SynthConfig.preset("small")
    names = [d.name for d in cfg.datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique, got {names}")
    cio.makedirs(out, storage_options)
    jobs = [(spec, cfg, out, i, storage_options) for spec in cfg.datasets for i in range(spec.num_shards)]
    shards: dict[str, list[WrittenShard]] = {d.name: [] for d in cfg.datasets}
    truth: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(_iter_with_progress(pool.map(_write_shard, jobs), jobs, progress))
    else:
        results = list(_iter_with_progress(map(_write_shard, jobs), jobs, progress))
    for (spec, *_), (written, rows) in zip(jobs, results):
        shards[spec.name].append(written)
        truth.extend(rows)
    counts: dict[str, dict[str, int]] = {}
    for row in truth:
        c = counts.setdefault(row["dataset"], {})
        c[row["noise"]] = c.get(row["noise"], 0) + 1
    schema = pa.schema([("dataset", pa.string()), ("kind", pa.string()), ("shard", pa.string()), ("key", pa.string()),
                        ("noise", pa.string()), ("source_key", pa.string()), ("detail", pa.string())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(truth, schema=schema), buf)
    gt_url = cio.join(out, "ground_truth.parquet")
    cio.write_bytes(gt_url, buf.getvalue(), storage_options)
    result = SynthResult(out=out, shards=shards, ground_truth=gt_url, counts=counts)
    corpus = {"config": asdict(cfg), **result.summary(),
              "shards": {k: [s.to_dict() for s in v] for k, v in shards.items()}}
    cio.write_bytes(cio.join(out, "corpus.json"), json.dumps(corpus, indent=2).encode(), storage_options)
    return result


def _iter_with_progress(results: Any, jobs: list, progress: Callable[[str, int], None] | None) -> Iterator:
    for job, res in zip(jobs, results):
        if progress is not None:
            progress(job[0].name, res[0].nsamples)
        yield res


def load_ground_truth(out: str, storage_options: dict[str, Any] | None = None):
    """The ground truth table of a synthesized corpus, as a polars DataFrame."""
    import polars as pl

    return pl.read_parquet(io.BytesIO(cio.read_bytes(cio.join(out, "ground_truth.parquet"), storage_options)))
