"""Streaming, kind-aware WebDataset shard readers, from any fsspec URL.

A shard is a POSIX tar whose members are grouped into samples by key: the member
``a/b/000123.jpg`` belongs to sample ``a/b/000123`` with extension ``jpg`` (the
WebDataset convention: the key runs up to the first dot of the base name). Members of a
sample are contiguous in the tar.

The reader streams the tar (``curation.data.tarstream.scan`` over an fsspec file object), holds
one sample in memory at a time, never extracts anything to disk, and yields exactly one
record per key it finds. A sample it cannot read still comes out, with ``error`` set.
"""

from __future__ import annotations

import hashlib
import io
import json
import gzip
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import braceexpand

from curation.data import storage
from curation.data.tarstream import TarFormatError, scan
from curation.data.samples import (
    IMAGE_EXTS,
    KINDS,
    VIDEO_EXTS,
    InterleavedSample,
    PairSample,
    Sample,
    VideoSample,
)

log = logging.getLogger(__name__)

# A decompression bomb declares a huge canvas in a tiny file; refuse before decoding.
DEFAULT_MAX_PIXELS = 64_000_000
# One member larger than this is not read into memory (bounded memory per sample).
DEFAULT_MAX_MEMBER_BYTES = 1 << 30

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class ReadOptions:
    """How strictly the reader checks each sample."""

    kind: str = "auto"  # "pair" | "interleaved" | "video" | "auto" (decided per sample)
    verify: bool = True  # decode images / probe videos so that corrupt media is reported here
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, "auto"):
            raise ValueError(f"unknown sample kind {self.kind!r}; expected one of {', '.join(KINDS)} or 'auto'")
        if self.max_pixels <= 0:
            raise ValueError("max_pixels must be positive")


# --------------------------------------------------------------------------- shard URLs


def shard_name(url: str) -> str:
    """``s3://b/coyo/00012.tar`` -> ``00012``."""
    name = storage.basename(url)
    for suf in TAR_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def dataset_of(url: str) -> str:
    """The default dataset name of a shard: its parent folder's name."""
    return storage.basename(storage.dirname(url))


def list_shards(spec: str | Iterable[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand a shard spec into sorted shard URLs.

    Accepts a single ``.tar`` URL, a folder (every tar directly inside), a brace pattern
    (``data/{00000..00009}.tar``, the WebDataset convention), a glob, or a list of these.
    """
    if not isinstance(spec, str):
        out: list[str] = []
        for s in spec:
            out.extend(list_shards(s, storage_options))
        return sorted(dict.fromkeys(out))
    urls: list[str] = []
    for one in braceexpand.braceexpand(spec):
        if any(ch in one for ch in "*?["):
            fs, path = storage.get_fs(one, storage_options)
            urls.extend(storage.to_url(fs, p) for p in sorted(fs.glob(path)) if p.endswith(TAR_SUFFIXES))
        elif one.endswith(TAR_SUFFIXES):
            urls.append(one)
        else:
            found = [u for u in storage.list_files(one, storage_options=storage_options) if u.endswith(TAR_SUFFIXES)]
            if not found and not storage.exists(one, storage_options):
                raise FileNotFoundError(f"no such shard or folder: {one}")
            urls.extend(found)
    return sorted(dict.fromkeys(urls))


# --------------------------------------------------------------------------- raw tar stream


class ShardError(ValueError):
    """A shard that holds no sample to report an error on: empty, or not a tar at all. Every
    other problem with a tar is reported on the sample it damaged."""


@dataclass
class RawMember:
    name: str
    data: bytes | None
    error: str | None = None
    fatal: bool = False  # the tar broke here: nothing after this member can be read


def split_key(name: str) -> tuple[str, str] | None:
    m = _KEY_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2)


def unsafe_name(name: str) -> str | None:
    """Why a member name is unsafe to use as a path, or None."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return f"absolute member path {name!r}"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return f"member path with '..' {name!r}"
    return None


def iter_members(fileobj: Any, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawMember]:
    """Stream the members of a tar (never extracting anything).

    When the tar itself is broken (truncated, malformed header, cut gzip stream) the last
    member is ``fatal``: it carries the error, named after the member the damage belongs to,
    or ``""`` when no trustworthy name is left; everything before it was yielded as usual.
    """
    try:
        for e in scan(fileobj, max_size=max_member_bytes):
            if not e.is_file:
                yield RawMember(e.name, None, f"unsupported tar member type for {e.name!r} (links and devices are refused)")
            elif e.skipped:
                yield RawMember(e.name, None, f"member {e.name!r} is {e.size} bytes, above the {max_member_bytes}-byte limit")
            else:
                yield RawMember(e.name, e.data)
    except TarFormatError as err:
        yield RawMember(err.member or "", None, f"truncated or corrupt tar: {err}", fatal=True)


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _key_of(name: str) -> tuple[str, str | None]:
    parts = split_key(name)
    return parts if parts else (name, None)


def iter_raw_samples(fileobj: Any, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """Group tar members into samples by key (contiguous members, WebDataset style).

    A broken tar ends the stream after every sample complete before the damage: the error
    goes to the sample the damaged member belongs to (a new record when it starts a new
    key), or to the sample being assembled when the damage names no member. A shard with
    no sample to carry the error (empty, not a tar) raises :class:`ShardError`. Members of
    a key that reappears after other keys are not a sample of their own (WebDataset would
    yield the key twice); they are skipped with a warning so that every key has one record.
    """
    current: RawSample | None = None
    seen: set[str] = set()
    for m in iter_members(fileobj, max_member_bytes):
        key, ext = _key_of(m.name)
        starts_new = m.name != "" and (current is None or key != current.key)
        if starts_new and key in seen:
            if not m.fatal:
                log.warning("tar member %r: key %r already appeared earlier in this shard (members not "
                            "contiguous); skipping it", m.name, key)
                continue
            starts_new = False  # the damage names an earlier sample: report it on the one being read
        if starts_new:
            if current is not None:
                yield current
            current = RawSample(key=key)
            seen.add(key)
        if current is None:  # the tar broke before its first member
            raise ShardError(m.error or "broken tar")
        if m.fatal:
            current.errors.append(m.error or "broken tar")
            yield current
            return
        _add_member(current, m, ext)
    if current is not None:
        yield current


def _add_member(sample: RawSample, m: RawMember, ext: str | None) -> None:
    bad = unsafe_name(m.name)
    if bad:
        sample.errors.append(bad)
    if ext is None:
        sample.errors.append(f"member {m.name!r} has no extension")
    if m.error:
        sample.errors.append(m.error)
    elif (ext or "") in sample.members:
        sample.errors.append(f"duplicate member {m.name!r}")
    else:
        sample.members[ext or ""] = m.data or b""


# --------------------------------------------------------------------------- media checks


class MediaError(ValueError):
    """A media member that cannot be used; the message is the sample's error reason."""


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True) -> tuple[int, int]:
    """Return (width, height) or raise ValueError with a clear reason."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MediaError("empty image member")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise MediaError(f"image is {w}x{h} = {w * h} pixels, above the {max_pixels}-pixel limit (decompression bomb?)")
            if decode:
                im.load()
            return w, h
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError("corrupt image: not a recognizable image format") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is above the {max_pixels}-pixel limit (decompression bomb?): {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of this sample
        raise MediaError(f"corrupt image: {e}") from None


def check_video(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Probe a clip with PyAV; return width/height/frames/duration or raise ValueError."""
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
            n = sum(1 for _ in container.decode(stream))
            if n == 0:
                raise MediaError("corrupt video: no decodable frames")
            duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
            return {"width": w, "height": h, "num_frames": n, "duration": duration}
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


def build_pair(raw: RawSample, base: dict[str, Any], opts: ReadOptions) -> PairSample:
    errors = list(raw.errors)
    s = PairSample(**base)
    s.meta = _meta(raw, errors)
    img = _find(raw.members, IMAGE_EXTS)
    if img is None:
        errors.append(f"missing image member (one of .{', .'.join(IMAGE_EXTS)})")
    else:
        s.image, s.image_ext = raw.members[img], img
        try:
            s.width, s.height = check_image(s.image, opts.max_pixels, decode=opts.verify)
        except ValueError as e:
            errors.append(str(e))
    txt = _find(raw.members, ("txt",))
    if txt is None:
        errors.append("missing caption member (.txt)")
    else:
        try:
            s.caption = decode_text(raw.members[txt], "caption (.txt)")
        except ValueError as e:
            errors.append(str(e))
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
                    s.image_sizes.append(check_image(s.images[name], opts.max_pixels, decode=opts.verify))
                except ValueError as e:
                    errors.append(f"image {name}: {e}")
    s.error = "; ".join(errors) or None
    return s


def build_video(raw: RawSample, base: dict[str, Any], opts: ReadOptions) -> VideoSample:
    errors = list(raw.errors)
    s = VideoSample(**base)
    s.meta = _meta(raw, errors)
    vid = _find(raw.members, VIDEO_EXTS)
    if vid is None:
        errors.append(f"missing video member (one of .{', .'.join(VIDEO_EXTS)})")
    else:
        s.video, s.video_ext = raw.members[vid], vid
        if opts.verify:
            try:
                info = check_video(s.video, opts.max_pixels)
                s.width, s.height = info["width"], info["height"]
                s.num_frames, s.duration = info["num_frames"], info["duration"]
            except ValueError as e:
                errors.append(str(e))
    txt = _find(raw.members, ("txt",))
    if txt is None:
        errors.append("missing caption member (.txt)")
    else:
        try:
            s.caption = decode_text(raw.members[txt], "caption (.txt)")
        except ValueError as e:
            errors.append(str(e))
    s.error = "; ".join(errors) or None
    return s


_BUILDERS = {"pair": build_pair, "interleaved": build_interleaved, "video": build_video}


def to_sample(raw: RawSample, dataset: str, shard: str, url: str | None, opts: ReadOptions) -> Sample:
    kind = opts.kind if opts.kind != "auto" else detect_kind(raw.members)
    base = {"dataset": dataset, "shard": shard, "key": raw.key, "members": raw.members, "url": url}
    try:
        return _BUILDERS[kind](raw, base, opts)
    except Exception as e:  # noqa: BLE001 - one bad sample must never stop the shard
        cls = {"pair": PairSample, "interleaved": InterleavedSample, "video": VideoSample}[kind]
        s = cls(**base)
        s.error = f"unexpected error reading sample: {type(e).__name__}: {e}"
        return s


def read_shard(
    url: str,
    kind: str = "auto",
    dataset: str | None = None,
    *,
    verify: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_options: dict[str, Any] | None = None,
    options: ReadOptions | None = None,
) -> Iterator[Sample]:
    """Stream the samples of one shard (local path or any fsspec URL).

    Yields one typed sample per key; unreadable samples carry ``error``. A tar that is
    truncated or corrupt yields every sample complete before the damage, then the damaged
    sample with the error, and stops. A shard with no sample to carry an error (empty,
    not a tar) raises :class:`ShardError`; one that cannot be opened raises ``OSError``.
    """
    opts = options or ReadOptions(kind=kind, verify=verify, max_pixels=max_pixels)
    ds = dataset or dataset_of(url)
    name = shard_name(url)
    with open_shard(url, storage_options) as f:
        try:
            for raw in iter_raw_samples(f, opts.max_member_bytes):
                yield to_sample(raw, ds, name, url, opts)
        except ShardError as e:
            raise ShardError(f"shard {url}: {e}") from None


def open_shard(url: str, storage_options: dict[str, Any] | None = None):
    """Open a shard for streaming; ``.tar.gz`` / ``.tgz`` are decompressed on the fly."""
    f = storage.open_url(url, "rb", storage_options)
    if url.endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


# --------------------------------------------------------------------------- shard info


@dataclass
class ShardInfo:
    url: str
    dataset: str
    name: str
    size: int
    checksum: str  # md5 of the bytes locally; the ETag on S3
    stats: dict[str, Any] | None = None  # img2dataset's <shard>_stats.json when present
    parquet: str | None = None  # img2dataset's per-shard <shard>.parquet when present


def file_checksum(url: str, storage_options: dict[str, Any] | None = None) -> tuple[int, str]:
    """(size, checksum): md5 of local files, the ETag of objects in a store."""
    fs, path = storage.get_fs(url, storage_options)
    info = fs.info(path)
    if storage.is_remote(url) and info.get("ETag"):
        return int(info["size"]), str(info["ETag"]).strip('"')
    h = hashlib.md5()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return int(info["size"]), h.hexdigest()


def shard_info(url: str, dataset: str | None = None, storage_options: dict[str, Any] | None = None) -> ShardInfo:
    size, checksum = file_checksum(url, storage_options)
    name = shard_name(url)
    base = storage.dirname(url)
    stats_url = storage.join(base, f"{name}_stats.json")
    parquet_url = storage.join(base, f"{name}.parquet")
    stats = None
    if storage.exists(stats_url, storage_options):
        try:
            stats = json.loads(storage.read_bytes(stats_url, storage_options))
        except ValueError:
            log.warning("ignoring unreadable stats file %s", stats_url)
    return ShardInfo(
        url=url,
        dataset=dataset or dataset_of(url),
        name=name,
        size=size,
        checksum=checksum,
        stats=stats,
        parquet=parquet_url if storage.exists(parquet_url, storage_options) else None,
    )


def count_samples(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Number of keys in a shard, without decoding any media."""
    with open_shard(url, storage_options) as f:
        return sum(1 for _ in iter_raw_samples(f))

