"""Convert MMC4's released jsonl documents plus a folder of images into WebDataset shards.

MMC4 ships documents as jsonl (``docs_shard_{i}_v2.jsonl``, often zipped), one document
per line with ``url``, ``text_list``, ``image_info`` (``image_name``, ``raw_url``,
``matched_text_index``, ``matched_sim``) and ``similarity_matrix`` (images x sentences),
and the images separately. Each document becomes one sample: ``<key>.json`` is the
document, ``<key>.<image_name>`` each of its images (so the JSON's ``image_name`` is the
member's extension and the reader can pair them without a lookup table).

An image listed by a document but absent from the folder is removed from ``image_info``
and from ``similarity_matrix`` and recorded in the document's ``missing_images``; a line
that is not a valid document is counted and reported, never written.
"""

from __future__ import annotations

import gzip
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from curation.data import storage
from curation.data.writer import ShardWriter, WrittenShard


@dataclass
class ImportReport:
    documents: int = 0
    written: int = 0
    images: int = 0
    missing_images: int = 0
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason"
    shards: list[WrittenShard] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "written": self.written,
            "images": self.images,
            "missing_images": self.missing_images,
            "bad_lines": self.bad_lines,
            "shards": [s.to_dict() for s in self.shards],
        }


def _iter_lines(path: str) -> Iterator[tuple[str, int, bytes]]:
    """(file label, line number, raw line) for .jsonl, .jsonl.gz and .zip (every jsonl inside)."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                if name.endswith(".jsonl"):
                    with zf.open(name) as f:
                        for i, line in enumerate(f, 1):
                            yield f"{os.path.basename(path)}/{name}", i, line
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for i, line in enumerate(f, 1):
            yield os.path.basename(path), i, line


def _index_images(folder: str) -> dict[str, str]:
    index: dict[str, str] = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            index.setdefault(name, os.path.join(root, name))
    return index


def _validate(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return "document is not a JSON object"
    if not isinstance(doc.get("text_list"), list) or not all(isinstance(t, str) for t in doc["text_list"]):
        return "missing or invalid 'text_list' (a list of strings)"
    info = doc.get("image_info", [])
    if not isinstance(info, list):
        return "'image_info' is not a list"
    for i, e in enumerate(info):
        if not isinstance(e, dict) or not isinstance(e.get("image_name"), str) or not e["image_name"]:
            return f"image_info[{i}] has no image_name"
        if "/" in e["image_name"] or e["image_name"].startswith("."):
            return f"image_info[{i}].image_name {e['image_name']!r} is not a plain file name"
    return None


def _attach_images(doc: dict[str, Any], index: dict[str, str]) -> tuple[dict[str, bytes], int, int]:
    """Read the images ``doc`` lists into members; drop the ones not in the folder from
    ``image_info`` (and their similarity rows), naming them in ``missing_images``.
    Returns (members, images attached, images missing)."""
    members: dict[str, bytes] = {}
    kept_info, kept_rows, missing = [], [], []
    sim = doc.get("similarity_matrix")
    for i, entry in enumerate(doc.get("image_info", [])):
        name = entry["image_name"]
        src = index.get(name)
        if src is None:
            missing.append(name)
            continue
        with open(src, "rb") as f:
            members[name] = f.read()
        kept_info.append(entry)
        if isinstance(sim, list) and i < len(sim):
            kept_rows.append(sim[i])
    doc["image_info"] = kept_info
    if isinstance(sim, list):
        doc["similarity_matrix"] = kept_rows
    if missing:
        doc["missing_images"] = missing
    return members, len(kept_info), len(missing)


def _parse(label: str, line_no: int, line: str, report: "ImportReport") -> dict[str, Any] | None:
    """The document on one jsonl line, or None (with the reason in ``report.bad_lines``)."""
    try:
        doc = json.loads(line)
    except ValueError as e:
        report.bad_lines.append(f"{label}:{line_no}: invalid JSON: {e}")
        return None
    reason = _validate(doc)
    if reason:
        report.bad_lines.append(f"{label}:{line_no}: {reason}")
        return None
    return doc


def import_mmc4(
    jsonl: list[str],
    images: str,
    out: str,
    *,
    samples_per_shard: int = 1000,
    max_bytes: int = 1 << 30,
    storage_options: dict[str, Any] | None = None,
) -> ImportReport:
    """Convert MMC4 jsonl files (local) and their image folder into shards under ``out``."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    for p in jsonl:
        if not os.path.exists(p):
            raise FileNotFoundError(f"MMC4 document file not found: {p}")
    index = _index_images(images)
    report = ImportReport()
    with ShardWriter(out, "{index:05d}.tar", max_samples=samples_per_shard, max_bytes=max_bytes,
                     storage_options=storage_options) as writer:
        for path in jsonl:
            for label, line_no, line in _iter_lines(path):
                if not line.strip():
                    continue
                report.documents += 1
                doc = _parse(label, line_no, line, report)
                if doc is None:
                    continue
                members, attached, missing = _attach_images(doc, index)
                report.images += attached
                report.missing_images += missing
                # a running number: line numbers restart in every file (and every jsonl of a zip)
                writer.write({"__key__": f"{report.documents:011d}", "json": json.dumps(doc).encode(), **members})
                report.written += 1
    report.shards = writer.written
    storage.write_bytes(storage.join(out, "import_report.json"), json.dumps(report.to_dict(), indent=2).encode(), storage_options)
    return report
