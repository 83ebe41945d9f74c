"""The scorer interface: a plain class that turns a batch of samples into columns.

A scorer has a ``name``, a ``version``, the ``kinds`` of sample it understands and the
``schema`` of the columns it produces. ``setup()`` loads models once; ``score(samples)``
returns one value per sample for every column. For engines that overlap decoding with
model compute, scoring is split in two: ``prepare(samples)`` (CPU: decode, resize,
tokenize; thread-safe, no model) and ``compute(prepared)`` (the model). ``score`` is
simply ``compute(prepare(samples))``.

A sample the scorer cannot score gets a row with ``error`` set and null scores; the
engine also writes such rows for samples that could not be read at all. Scorers import
neither Ray nor Prefect: run one in a notebook on a list of samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import pyarrow as pa

if TYPE_CHECKING:  # scorers depend on the sample model only by shape (kind, error, payload fields)
    from curation.data.samples import Sample


@dataclass
class Prepared:
    """What ``prepare`` hands to ``compute``: the samples, per-sample errors, and payload."""

    samples: list["Sample"]
    errors: list[str | None]
    payload: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Scorer:
    name: ClassVar[str] = "scorer"
    version: ClassVar[str] = "0"
    kinds: ClassVar[tuple[str, ...]] = ("pair", "interleaved", "video")
    # may ``prepare`` run on several decode threads at once? (False: the engine serializes it)
    prepare_threadsafe: ClassVar[bool] = False

    # ---- identity -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything that changes the scores (JSON-serializable)."""
        return {}

    def model_id(self) -> str | None:
        return None

    def weights_checksum(self) -> str | None:
        return None

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model": self.model_id(),
            "weights_sha256": self.weights_checksum(),
            "config": self.config(),
        }

    def config_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- schema ---------------------------------------------------------------------
    def schema(self) -> pa.Schema:
        """The score columns (identity and ``error`` columns are added by the engine)."""
        raise NotImplementedError

    # ---- work -----------------------------------------------------------------------
    def setup(self) -> None:
        """Load models; called once per worker before any scoring."""

    def prepare(self, samples: Sequence["Sample"]) -> Prepared:
        return Prepared(list(samples), [s.error for s in samples])

    def compute(self, prepared: Prepared) -> dict[str, list]:
        raise NotImplementedError

    def score(self, samples: Sequence["Sample"]) -> dict[str, list]:
        """Columns for ``samples`` (one value each), plus ``error`` (None where scored)."""
        prepared = self.prepare(samples)
        cols = self.compute(prepared)
        cols["error"] = list(prepared.errors)
        return cols

    # ---- helpers --------------------------------------------------------------------
    def empty_columns(self, n: int) -> dict[str, list]:
        return {f.name: [None] * n for f in self.schema()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


IDENTITY_SCHEMA = pa.schema(
    [("dataset", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("kind", pa.string()), ("error", pa.string())]
)


def decoded_image(sample: Any, name: str | None = None) -> Any:
    """A sample's image as a PIL image: the pixels the reader's verification decoded when it kept
    them (``sample.pixels``; one decode per pass, whatever the number of scorers), else opened
    from the bytes (decoded when first used). ``name``: which image of a document."""
    from PIL import Image

    if name is None:
        pixels, data = getattr(sample, "pixels", None), sample.image
    else:
        pixels, data = (getattr(sample, "pixels", None) or {}).get(name), sample.images[name]
    return pixels if pixels is not None else Image.open(io.BytesIO(data))


def decoded_frames(sample: Any) -> list[Any]:
    """A clip's frames as RGB PIL images: those the reader's verification decoded when it kept them
    (``sample.pixels``; one decode per pass), else decoded from the bytes here. Raises ValueError
    for a clip with no decodable frame."""
    kept = getattr(sample, "pixels", None)
    if kept:
        return list(kept)
    from model.image_processing import decode_video

    frames = decode_video(sample.video)
    if not frames:
        raise ValueError("video has no decodable frames")
    return frames


def file_sha256(path: str, _cache: dict[tuple[str, int, float], str] = {}) -> str:  # noqa: B006 - memo
    """SHA-256 of a local file, memoized on (path, size, mtime)."""
    st = os.stat(path)
    k = (os.path.abspath(path), st.st_size, st.st_mtime)
    if k not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[k] = h.hexdigest()
    return _cache[k]


def dir_sha256(path: str, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".json")) -> str:
    """SHA-256 over the weight and config files of a model directory."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(suffixes):
            h.update(name.encode())
            h.update(file_sha256(os.path.join(path, name)).encode())
    return h.hexdigest()
