"""Reading one sample of a shard cheaply, and its thumbnail, for ``curate explore``.

Scoring records where each sample's members lie in its shard (the ``basic`` scorer's
``tar_offset`` and ``tar_size``), so a sample is ONE ranged read (fsspec ``cat_file`` with
start and end: a ``Range`` GET on S3, a seek locally) parsed by the same tar scanner the
readers use. A gzipped shard has no usable offsets (NULL): it is scanned from the start
until the key is found. Thumbnails are JPEGs cached on disk under the explorer's cache
folder, never in the store.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from dataclasses import dataclass
from typing import Any

from curation.data import storage
from curation.data.builders import ReadOptions, to_sample
from curation.data.records import iter_raw_samples, open_shard, shard_name
from curation.data.samples import Sample

THUMB_PX = 192


class SampleNotFound(LookupError):
    """No such (dataset, shard, key): the message says what is missing."""


@dataclass
class Location:
    dataset: str
    shard: str
    key: str
    url: str
    offset: int | None = None
    size: int | None = None
    checksum: str | None = None  # of the shard as scored: a rescored, rewritten shard gets new thumbnails


def _options() -> ReadOptions:
    return ReadOptions(kind="auto", verify=True)


def read_sample(loc: Location, storage_options: dict[str, Any] | None = None) -> Sample:
    """The sample at ``loc``: one ranged read when its offsets are known, else a scan of its shard."""
    if loc.offset is not None and loc.size:
        fs, path = storage.get_fs(loc.url, storage_options)
        data = fs.cat_file(path, start=loc.offset, end=loc.offset + loc.size)
        for raw in iter_raw_samples(io.BytesIO(data)):
            if raw.key == loc.key:
                return to_sample(raw, loc.dataset, shard_name(loc.url), loc.url, _options())
        raise SampleNotFound(f"bytes {loc.offset}..{loc.offset + loc.size} of {loc.url} do not hold key {loc.key!r} "
                             f"(the shard changed since it was scored?)")
    with open_shard(loc.url, storage_options) as f:  # gzip, or scored before offsets were recorded
        for raw in iter_raw_samples(f):
            if raw.key == loc.key:
                return to_sample(raw, loc.dataset, shard_name(loc.url), loc.url, _options())
    raise SampleNotFound(f"no key {loc.key!r} in shard {loc.url}")


def caption_of(s: Sample) -> str:
    if s.kind == "interleaved":
        return " ".join(getattr(s, "text_list", []) or [])
    return getattr(s, "caption", None) or ""


def first_image(s: Sample) -> bytes | None:
    """Encoded bytes of the sample's picture: the image, the document's first image, or the
    clip's first frame (as JPEG)."""
    if s.kind == "pair":
        return getattr(s, "image", None)
    if s.kind == "interleaved":
        imgs = getattr(s, "images", {}) or {}
        return next(iter(imgs.values()), None)
    frames = video_frames(getattr(s, "video", None), 1)
    return frames[0] if frames else None


def video_frames(video: bytes | None, n: int = 4) -> list[bytes]:
    """Up to ``n`` frames spread over the clip, as JPEG bytes (empty when it cannot decode)."""
    if not video:
        return []
    import av

    try:
        with av.open(io.BytesIO(video)) as c:
            frames = [f.to_image() for f in c.decode(video=0)]
    except Exception:  # noqa: BLE001 - an undecodable clip has no frames to show
        return []
    if not frames:
        return []
    step = max(1, len(frames) // n)
    out = []
    for im in frames[::step][:n]:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def thumbnail(image: bytes | None, px: int = THUMB_PX) -> bytes:
    """A JPEG at most ``px`` on its long side; a grey square when the image cannot decode."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(image or b""))
        im.draft("RGB", (px, px))
        im = im.convert("RGB")
        im.thumbnail((px, px))
    except Exception:  # noqa: BLE001 - an unreadable image still gets a (blank) tile
        im = Image.new("RGB", (px // 2, px // 2), (90, 90, 90))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


class ThumbCache:
    """Thumbnails on disk, named by the sample's identity and where its bytes are."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def path(self, loc: Location) -> str:
        ident = "\0".join([loc.url, loc.key, str(loc.offset), str(loc.size), str(loc.checksum)])
        h = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.folder, h[:2], h + ".jpg")

    def get(self, loc: Location, storage_options: dict[str, Any] | None = None) -> tuple[bytes, str]:
        """The sample's thumbnail (JPEG) and caption: one read of the sample makes both."""
        p = self.path(loc)
        try:
            with open(p, "rb") as f, open(p[:-4] + ".txt", encoding="utf-8") as t:
                return f.read(), t.read()
        except FileNotFoundError:
            pass
        s = read_sample(loc, storage_options)
        data, caption = thumbnail(first_image(s)), caption_of(s)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        for dest, payload in ((p[:-4] + ".txt", caption.encode("utf-8", "replace")), (p, data)):
            tmp = f"{dest}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, dest)  # never a half-written file
        return data, caption
