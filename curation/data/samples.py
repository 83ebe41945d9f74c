"""Typed training samples for the three kinds of data the service curates.

Every sample carries its identity ``(dataset, shard, key)`` where ``key`` is the
WebDataset ``__key__``. A sample that could not be read is still a sample: ``error`` is
set to a reason string and the payload fields hold whatever could be read, so that every
input sample can be accounted for downstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

Kind = Literal["pair", "interleaved", "video"]
KINDS: tuple[str, ...] = ("pair", "interleaved", "video")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


@dataclass
class Sample:
    """Base of all samples: identity, the raw tar members, and an optional error."""

    kind: ClassVar[str] = "unknown"

    dataset: str
    shard: str
    key: str
    # raw tar members of this sample, by extension (e.g. "jpg", "txt", "json"); kept as
    # bytes so that resharding can copy them unchanged
    members: dict[str, bytes] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    error: str | None = None
    url: str | None = field(default=None, repr=False)
    # bytes [tar_offset, tar_offset + tar_size) of the shard hold every member of this sample
    # (None for a compressed shard, where byte offsets cannot be read from directly)
    tar_offset: int | None = field(default=None, repr=False)
    tar_size: int | None = field(default=None, repr=False)

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.dataset, self.shard, self.key)

    @property
    def ok(self) -> bool:
        return self.error is None

    def nbytes(self) -> int:
        return sum(len(v) for v in self.members.values())

    def to_wds(self) -> dict[str, Any]:
        """The sample as a webdataset dict: ``__key__`` plus raw members."""
        d: dict[str, Any] = {"__key__": self.key}
        d.update(self.members)
        return d


@dataclass
class PairSample(Sample):
    """One image and one caption, as img2dataset writes them."""

    kind: ClassVar[str] = "pair"

    image: bytes | None = field(default=None, repr=False)
    image_ext: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    # the decoded image (PIL) when the reader was asked to keep what verification decoded, so that
    # scorers use those pixels instead of decoding again (ReadOptions.keep_pixels)
    pixels: Any = field(default=None, repr=False, compare=False)


@dataclass
class InterleavedSample(Sample):
    """One MMC4 web document: sentences, and images each matched to a sentence."""

    kind: ClassVar[str] = "interleaved"

    text_list: list[str] = field(default_factory=list)
    # MMC4's image_info entries (image_name, raw_url, matched_text_index, matched_sim)
    image_info: list[dict[str, Any]] = field(default_factory=list)
    # image_name -> encoded bytes, in image_info order
    images: dict[str, bytes] = field(default_factory=dict, repr=False)
    similarity_matrix: list[list[float]] | None = field(default=None, repr=False)
    doc_url: str | None = None
    # (width, height) per image, in image_info order, when decoding was checked
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)
    # image_name -> decoded image (PIL), as for PairSample.pixels
    pixels: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class VideoSample(Sample):
    """One clip and its caption, as video2dataset writes them."""

    kind: ClassVar[str] = "video"

    video: bytes | None = field(default=None, repr=False)
    video_ext: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    duration: float | None = None
    # the frames verification decoded (PIL images), kept for the scorers (ReadOptions.keep_pixels)
    pixels: Any = field(default=None, repr=False, compare=False)


AnySample = Union[PairSample, InterleavedSample, VideoSample]

SAMPLE_CLASSES: dict[str, type[Sample]] = {
    "pair": PairSample,
    "interleaved": InterleavedSample,
    "video": VideoSample,
}


def sample_record(sample: Sample) -> dict[str, Any]:
    """A flat, JSON-serializable summary of a sample (no payload bytes)."""
    rec: dict[str, Any] = {
        "dataset": sample.dataset,
        "shard": sample.shard,
        "key": sample.key,
        "kind": sample.kind,
        "error": sample.error,
        "members": sorted(sample.members),
        "nbytes": sample.nbytes(),
    }
    if isinstance(sample, PairSample):
        rec.update(caption=sample.caption, width=sample.width, height=sample.height)
    elif isinstance(sample, InterleavedSample):
        rec.update(num_sentences=len(sample.text_list), num_images=len(sample.image_info))
    elif isinstance(sample, VideoSample):
        rec.update(caption=sample.caption, width=sample.width, height=sample.height, num_frames=sample.num_frames)
    return rec


def dumps_record(sample: Sample) -> str:
    return json.dumps(sample_record(sample), sort_keys=True)
