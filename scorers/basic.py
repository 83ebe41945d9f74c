"""Cheap per-sample facts: decodable or not, sizes, caption length, exact and perceptual hashes.

``tar_offset`` and ``tar_size`` say which bytes of the shard hold the sample (a ranged read
fetches it; NULL in a gzipped shard).

The selection step builds its validity rules (min size, max aspect ratio, caption length)
and its dedup rules (SHA-256 for exact duplicates, perceptual hash for near duplicates)
on these columns.

``motion`` (video only) says how much a clip moves: the share of pixels whose colour changes
by more than ``MOTION_DELTA`` of full scale between consecutive frames, averaged over the
frame pairs, after ``MOTION_POOL`` x ``MOTION_POOL`` averaging so that sensor and codec noise
(which flickers every pixel a little) does not count as motion. A static clip scores ~0, a
clip whose subject crosses the frame a few percent; the selection's motion threshold is
calibrated on trusted clips (``curation.selection.calibrate``).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Sequence

import pyarrow as pa

from scorers.base import Prepared, Scorer, decoded_frames, decoded_image


def phash_hex(image_bytes: bytes | None = None, pil_image: Any = None) -> str | None:
    """64-bit DCT perceptual hash as 16 hex digits (imagehash.phash)."""
    import imagehash
    from PIL import Image

    try:
        im = pil_image if pil_image is not None else Image.open(io.BytesIO(image_bytes))
        return str(imagehash.phash(im.convert("RGB")))
    except Exception:  # noqa: BLE001 - an undecodable image simply has no perceptual hash
        return None


def _image_phash(sample: Any, name: str | None = None) -> str | None:
    try:
        return phash_hex(pil_image=decoded_image(sample, name))
    except Exception:  # noqa: BLE001 - an undecodable image simply has no perceptual hash
        return None


def _text_stats(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    return len(text), len(text.split())


MOTION_POOL = 4
MOTION_DELTA = 0.08


def motion_score(frames: Sequence[Any]) -> float | None:
    """Mean share of pooled pixels that change by more than ``MOTION_DELTA`` between consecutive
    frames (frames: HxWx3 uint8 arrays); None for fewer than two frames."""
    import numpy as np

    if len(frames) < 2:
        return None
    pooled = []
    for f in frames:
        a = np.asarray(f, dtype=np.float32) / 255.0
        h, w = (a.shape[0] // MOTION_POOL) * MOTION_POOL, (a.shape[1] // MOTION_POOL) * MOTION_POOL
        if h == 0 or w == 0:  # smaller than one pooling block: compare raw pixels
            pooled.append(a)
            continue
        a = a[:h, :w].reshape(h // MOTION_POOL, MOTION_POOL, w // MOTION_POOL, MOTION_POOL, -1).mean(axis=(1, 3))
        pooled.append(a)
    changed = [float((np.abs(b - a).max(axis=-1) > MOTION_DELTA).mean()) for a, b in zip(pooled, pooled[1:])]
    return float(np.mean(changed))


class BasicScorer(Scorer):
    name = "basic"
    version = "3"  # 2: motion; 3: tar_offset, tar_size

    def config(self) -> dict[str, Any]:
        return {"phash": "imagehash.phash-64", "motion": {"pool": MOTION_POOL, "delta": MOTION_DELTA}}

    def schema(self) -> pa.Schema:
        return pa.schema(
            [
                ("decodable", pa.bool_()),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("aspect_ratio", pa.float32()),  # long side / short side, >= 1
                ("caption_chars", pa.int32()),
                ("caption_words", pa.int32()),
                ("num_images", pa.int32()),
                ("num_frames", pa.int32()),
                ("sha256", pa.string()),  # of the image / document / clip bytes: exact-dup key
                ("phash", pa.string()),  # of the image / first image / first frame: near-dup key
                ("motion", pa.float32()),  # video: share of pixels changing between frames (module docstring)
                # where the sample's members lie in its shard: one ranged read fetches it
                # (``curate explore``); NULL for a gzipped shard
                ("tar_offset", pa.int64()),
                ("tar_size", pa.int64()),
            ]
        )

    prepare_threadsafe = True

    def prepare(self, samples: Sequence[Any]) -> Prepared:
        # all of the work is here, on the engine's decode threads (no model); basic facts are
        # computed for unreadable samples too (decodable = False)
        cols: dict[str, list] = {f.name: [] for f in self.schema()}
        for s in samples:
            row = self._row(s)
            for k in cols:
                cols[k].append(row.get(k))
        return Prepared(list(samples), [s.error for s in samples], cols)

    def compute(self, prepared: Prepared) -> dict[str, list]:
        return prepared.payload

    def _row(self, s: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"decodable": s.error is None, "tar_offset": getattr(s, "tar_offset", None),
                               "tar_size": getattr(s, "tar_size", None)}
        w = h = None
        if s.kind == "pair":
            w, h = s.width, s.height
            row["caption_chars"], row["caption_words"] = _text_stats(s.caption)
            row["num_images"] = 1 if s.image is not None else 0
            if s.image is not None:
                row["sha256"] = hashlib.sha256(s.image).hexdigest()
                if s.error is None:
                    row["phash"] = _image_phash(s)
        elif s.kind == "interleaved":
            text = " ".join(s.text_list) if s.text_list else None
            row["caption_chars"], row["caption_words"] = _text_stats(text)
            row["num_images"] = len(s.image_info)
            if s.image_sizes:
                w, h = s.image_sizes[0]
            doc = s.members.get("json")
            if doc is not None:
                # images are hashed with the text so that a re-hosted copy is still a duplicate
                hsh = hashlib.sha256(doc)
                for name in sorted(s.images):
                    hsh.update(s.images[name])
                row["sha256"] = hsh.hexdigest()
            if s.error is None and s.images:
                row["phash"] = _image_phash(s, next(iter(s.images)))
        elif s.kind == "video":
            w, h = s.width, s.height
            row["caption_chars"], row["caption_words"] = _text_stats(s.caption)
            row["num_frames"] = s.num_frames
            if s.video is not None:
                row["sha256"] = hashlib.sha256(s.video).hexdigest()
                if s.error is None:
                    row["phash"], row["motion"] = _video_facts(s)
        row["width"], row["height"] = w, h
        if w and h:
            row["aspect_ratio"] = max(w, h) / min(w, h)
        return row


def _video_facts(s: Any) -> tuple[str | None, float | None]:
    """First frame's perceptual hash and the clip's motion score (None where it cannot decode),
    from the frames the reader decoded when it kept them (``decoded_frames``)."""
    try:
        frames = decoded_frames(s)
    except ValueError:  # an undecodable clip simply has neither
        return None, None
    return phash_hex(pil_image=frames[0]), motion_score(frames)
