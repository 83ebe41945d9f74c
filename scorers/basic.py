"""Cheap per-sample facts: decodable or not, sizes, caption length, exact and perceptual hashes.

The selection step builds its validity rules (min size, max aspect ratio, caption length)
and its dedup rules (SHA-256 for exact duplicates, perceptual hash for near duplicates)
on these columns.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Sequence

import pyarrow as pa

from scorers.base import Prepared, Scorer


def phash_hex(image_bytes: bytes | None = None, pil_image: Any = None) -> str | None:
    """64-bit DCT perceptual hash as 16 hex digits (imagehash.phash)."""
    import imagehash
    from PIL import Image

    try:
        im = pil_image if pil_image is not None else Image.open(io.BytesIO(image_bytes))
        return str(imagehash.phash(im.convert("RGB")))
    except Exception:  # noqa: BLE001 - an undecodable image simply has no perceptual hash
        return None


def _text_stats(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    return len(text), len(text.split())


class BasicScorer(Scorer):
    name = "basic"
    version = "1"

    def config(self) -> dict[str, Any]:
        return {"phash": "imagehash.phash-64"}

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
            ]
        )

    def prepare(self, samples: Sequence[Any]) -> Prepared:
        # basic facts are computed for unreadable samples too (decodable = False)
        return Prepared(list(samples), [s.error for s in samples])

    def compute(self, prepared: Prepared) -> dict[str, list]:
        cols: dict[str, list] = {f.name: [] for f in self.schema()}
        for s in prepared.samples:
            row = self._row(s)
            for k in cols:
                cols[k].append(row.get(k))
        return cols

    def _row(self, s: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"decodable": s.error is None}
        w = h = None
        if s.kind == "pair":
            w, h = s.width, s.height
            row["caption_chars"], row["caption_words"] = _text_stats(s.caption)
            row["num_images"] = 1 if s.image is not None else 0
            if s.image is not None:
                row["sha256"] = hashlib.sha256(s.image).hexdigest()
                if s.error is None:
                    row["phash"] = phash_hex(s.image)
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
                row["phash"] = phash_hex(next(iter(s.images.values())))
        elif s.kind == "video":
            w, h = s.width, s.height
            row["caption_chars"], row["caption_words"] = _text_stats(s.caption)
            row["num_frames"] = s.num_frames
            if s.video is not None:
                row["sha256"] = hashlib.sha256(s.video).hexdigest()
                if s.error is None:
                    row["phash"] = _first_frame_phash(s.video)
        row["width"], row["height"] = w, h
        if w and h:
            row["aspect_ratio"] = max(w, h) / min(w, h)
        return row


def _first_frame_phash(video: bytes) -> str | None:
    import av

    try:
        with av.open(io.BytesIO(video)) as c:
            for frame in c.decode(video=0):
                return phash_hex(pil_image=frame.to_image())
    except Exception:  # noqa: BLE001
        return None
    return None
