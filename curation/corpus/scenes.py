"""What the synthetic corpus draws and says: coloured shapes on coloured backgrounds, their
captions, and clips of a shape moving in a stated direction (rendered and encoded here).

The vocabulary (``SHAPES``, ``COLORS``, ``POSITIONS``, ``DIRECTIONS``) is also what caption
accuracy is judged on (``training_hooks/evaluate.py``)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


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


def render_background(base: np.ndarray, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """``base`` (an RGB colour, or a ``(height, width, 3)`` array) with the shading and grain every
    rendered scene has: what a scene looks like before its shape is drawn."""
    # low-frequency shading (like lighting in a photo) makes every image's layout its own,
    # so perceptual hashes of distinct images differ; fine grain keeps them from compressing
    # to nothing
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width), np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(-2.0, 2.0, size=2)
        field += np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + rng.uniform(0, 2 * np.pi))
    pix = np.asarray(base, np.float32) + 24.0 * field[..., None] + rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")


def render_scene(
    scene: Scene, width: int, height: int, rng: np.random.Generator, jitter: tuple[float, float] = (0.0, 0.0)
) -> Image.Image:
    im = render_background(np.array(COLORS[scene.bg], dtype=np.float32), width, height, rng)
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
