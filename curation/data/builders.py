"""Typed samples from raw tar records: one builder per kind (pair, interleaved, video).

A builder checks what a sample of its kind needs (a caption, decodable media under the pixel
limit, every image an MMC4 document lists) and returns a ``PairSample``, ``InterleavedSample``
or ``VideoSample``. A sample it cannot use still comes out, with ``error`` saying why.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterable

from curation.data.records import DEFAULT_MAX_MEMBER_BYTES, RawSample
from curation.data.samples import (
    IMAGE_EXTS,
    KINDS,
    VIDEO_EXTS,
    InterleavedSample,
    PairSample,
    Sample,
    VideoSample,
)

# A decompression bomb declares a huge canvas in a tiny file; refuse before decoding.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass
class ReadOptions:
    """How strictly the reader checks each sample."""

    kind: str = "auto"  # "pair" | "interleaved" | "video" | "auto" (decided per sample)
    verify: bool = True  # decode images / probe videos so that corrupt media is reported here
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    keep_pixels: bool = False  # keep the images verification decoded on the samples (one decode per pass)
    # a clip's decoded frames are kept (keep_pixels) up to this many bytes; a longer clip's are
    # dropped and each scorer that needs them decodes the clip itself
    max_kept_video_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, "auto"):
            raise ValueError(f"unknown sample kind {self.kind!r}; expected one of {', '.join(KINDS)} or 'auto'")
        if self.max_pixels <= 0:
            raise ValueError("max_pixels must be positive")


# --------------------------------------------------------------------------- media checks


class MediaError(ValueError):
    """A media member that cannot be used; the message is the sample's error reason."""


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True) -> tuple[int, int]:
    """Return (width, height) or raise ValueError with a clear reason."""
    w, h, _ = open_image(data, max_pixels, decode)
    return w, h


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True) -> tuple[int, int, Any]:
    """(width, height, the decoded PIL image or None when ``decode`` is off), or MediaError."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MediaError("empty image member")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise MediaError(f"image is {w}x{h} = {w * h} pixels, above the {max_pixels}-pixel limit (decompression bomb?)")
        if not decode:
            return w, h, None
        im.load()
        return w, h, im
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError("corrupt image: not a recognizable image format") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is above the {max_pixels}-pixel limit (decompression bomb?): {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of this sample
        raise MediaError(f"corrupt image: {e}") from None


def check_video(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, keep_bytes: int = 0) -> dict[str, Any]:
    """Decode a clip with PyAV; return width/height/num_frames/duration or raise ValueError.
    ``keep_bytes``: also return its ``frames`` (RGB PIL images) when they fit in that many bytes
    (``frames`` is None when they do not)."""
    import av

    if not data:
        raise MediaError("empty video member")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError("video has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                raise MediaError(f"video frame is {w}x{h}, above the {max_pixels}-pixel limit")
            n, kept = 0, [] if keep_bytes > 0 else None
            for frame in container.decode(stream):
                n += 1
                if kept is not None and n * frame.width * frame.height * 3 <= keep_bytes:
                    kept.append(frame.to_image())
                else:
                    kept = None
            if n == 0:
                raise MediaError("corrupt video: no decodable frames")
            duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
            return {"width": w, "height": h, "num_frames": n, "duration": duration, "frames": kept}
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many types; all mean "unusable clip"
        msg = str(e)
        if isinstance(e, av.error.FFmpegError):  # type: ignore[attr-defined]
            msg = getattr(e, "strerror", None) or msg
        raise MediaError(f"corrupt video: {msg}") from None


def decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MediaError(f"{what} is not valid UTF-8 (byte {e.start})") from None


def decode_json(data: bytes, what: str) -> Any:
    text = decode_text(data, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MediaError(f"invalid JSON in {what}: {e.msg} at line {e.lineno} column {e.colno}") from None


def _find(members: dict[str, bytes], exts: Iterable[str]) -> str | None:
    lower = {k.lower(): k for k in members}
    for e in exts:
        if e in lower:
            return lower[e]
    return None


# --------------------------------------------------------------------------- typed samples


def detect_kind(members: dict[str, bytes]) -> str:
    if _find(members, VIDEO_EXTS):
        return "video"
    j = _find(members, ("json",))
    if j is not None:
        try:
            doc = json.loads(members[j])
            if isinstance(doc, dict) and "text_list" in doc:
                return "interleaved"
        except (ValueError, UnicodeDecodeError):
            pass
    return "pair"


def _meta(raw: RawSample, errors: list[str]) -> dict[str, Any]:
    j = _find(raw.members, ("json",))
    if j is None:
        return {}
    try:
        meta = decode_json(raw.members[j], f"member {raw.key}.{j}")
    except ValueError as e:
        errors.append(str(e))
        return {}
    if not isinstance(meta, dict):
        errors.append(f"member {raw.key}.{j} is JSON but not an object")
        return {}
    return meta


def _start(raw: RawSample, base: dict[str, Any], cls: type, exts: Iterable[str], what: str) -> tuple[Any, list[str], str | None]:
    """A sample of ``cls`` with its metadata, the errors so far, and its media member's extension
    (None, with the error recorded, when there is none)."""
    errors = list(raw.errors)
    s = cls(**base)
    s.meta = _meta(raw, errors)
    ext = _find(raw.members, exts)
    if ext is None:
        errors.append(f"missing {what} member (one of .{', .'.join(exts)})")
    return s, errors, ext


def _caption(raw: RawSample, s: Any, errors: list[str]) -> None:
    """Set ``s.caption`` from the ``.txt`` member, or record why there is none."""
    txt = _find(raw.members, ("txt",))
    if txt is None:
        errors.append("missing caption member (.txt)")
    else:
        try:
            s.caption = decode_text(raw.members[txt], "caption (.txt)")
        except ValueError as e:
            errors.append(str(e))


def build_pair(raw: RawSample, base: dict[str, Any], opts: ReadOptions) -> PairSample:
    s, errors, img = _start(raw, base, PairSample, IMAGE_EXTS, "image")
    if img is not None:
        s.image, s.image_ext = raw.members[img], img
        try:
            s.width, s.height, im = open_image(s.image, opts.max_pixels, decode=opts.verify)
            s.pixels = im if opts.keep_pixels else None
        except ValueError as e:
            errors.append(str(e))
    _caption(raw, s, errors)
    s.error = "; ".join(errors) or None
    return s


def build_interleaved(raw: RawSample, base: dict[str, Any], opts: ReadOptions) -> InterleavedSample:
    errors = list(raw.errors)
    s = InterleavedSample(**base)
    j = _find(raw.members, ("json",))
    doc: Any = None
    if j is None:
        errors.append("missing document member (.json)")
    else:
        try:
            doc = decode_json(raw.members[j], "document (.json)")
        except ValueError as e:
            errors.append(str(e))
    if doc is not None:
        if not isinstance(doc, dict) or not isinstance(doc.get("text_list"), list):
            errors.append("document JSON has no 'text_list' list (not an MMC4 document)")
        else:
            s.meta = doc
            s.doc_url = doc.get("url")
            s.text_list = [t if isinstance(t, str) else str(t) for t in doc["text_list"]]
            s.similarity_matrix = doc.get("similarity_matrix")
            info = doc.get("image_info") or []
            if not isinstance(info, list):
                errors.append("document 'image_info' is not a list")
                info = []
            for i, entry in enumerate(info):
                name = entry.get("image_name") if isinstance(entry, dict) else None
                if not name:
                    errors.append(f"image_info[{i}] has no image_name")
                    continue
                s.image_info.append(entry)
                member = _find(raw.members, (name.lower(),))
                if member is None:
                    errors.append(f"missing image member {raw.key}.{name} listed in image_info[{i}]")
                    continue
                s.images[name] = raw.members[member]
                idx = entry.get("matched_text_index")
                if idx is not None and not (isinstance(idx, int) and 0 <= idx < len(s.text_list)):
                    errors.append(f"image_info[{i}].matched_text_index {idx!r} is outside text_list")
                try:
                    w, h, im = open_image(s.images[name], opts.max_pixels, decode=opts.verify)
                    s.image_sizes.append((w, h))
                    if opts.keep_pixels and im is not None:
                        s.pixels[name] = im
                except ValueError as e:
                    errors.append(f"image {name}: {e}")
    s.error = "; ".join(errors) or None
    return s


def build_video(raw: RawSample, base: dict[str, Any], opts: ReadOptions) -> VideoSample:
    s, errors, vid = _start(raw, base, VideoSample, VIDEO_EXTS, "video")
    if vid is not None:
        s.video, s.video_ext = raw.members[vid], vid
        if opts.verify:
            try:
                info = check_video(s.video, opts.max_pixels, opts.max_kept_video_bytes if opts.keep_pixels else 0)
                s.width, s.height = info["width"], info["height"]
                s.num_frames, s.duration = info["num_frames"], info["duration"]
                s.pixels = info["frames"]  # one decode per pass for every scorer that needs frames
            except ValueError as e:
                errors.append(str(e))
    _caption(raw, s, errors)
    s.error = "; ".join(errors) or None
    return s


_BUILDERS = {"pair": build_pair, "interleaved": build_interleaved, "video": build_video}


def to_sample(raw: RawSample, dataset: str, shard: str, url: str | None, opts: ReadOptions) -> Sample:
    kind = opts.kind if opts.kind != "auto" else detect_kind(raw.members)
    base = {"dataset": dataset, "shard": shard, "key": raw.key, "members": raw.members, "url": url}
    if 0 <= raw.start < raw.end and not (url or "").endswith((".gz", ".tgz")):  # no ranged reads into a gzip stream
        base.update(tar_offset=raw.start, tar_size=raw.end - raw.start)
    try:
        return _BUILDERS[kind](raw, base, opts)
    except Exception as e:  # noqa: BLE001 - one bad sample must never stop the shard
        cls = {"pair": PairSample, "interleaved": InterleavedSample, "video": VideoSample}[kind]
        s = cls(**base)
        s.error = f"unexpected error reading sample: {type(e).__name__}: {e}"
        return s
