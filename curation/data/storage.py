"""Filesystem access for every URL the service touches (local paths and ``s3://``).

Everything goes through fsspec so the same code reads a local folder, an S3 bucket, or a
MinIO/moto endpoint. For S3 endpoints other than AWS (MinIO, moto on loopback) set
``AWS_ENDPOINT_URL`` (the variable botocore itself honours) or pass ``storage_options``.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from curation.data.diskfull import naming_full_disk


def _s3_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs = dict(opts.get("client_kwargs") or {})
        client_kwargs.setdefault("endpoint_url", endpoint)
        opts["client_kwargs"] = client_kwargs
    return opts


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL; local paths come back absolute."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if is_remote(url):
        opts = _s3_options(storage_options) if url.startswith(("s3://", "s3a://")) else dict(storage_options or {})
        return url_to_fs(url, **opts)
    fs, path = url_to_fs(os.path.abspath(os.path.expanduser(url)))
    return fs, path


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URL parts with ``/`` for remote URLs and ``os.path`` for local ones."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/")) if is_remote(url) else os.path.basename(url.rstrip(os.sep))


def dirname(url: str) -> str:
    if is_remote(url):
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(url))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-relative path (as ``fs.ls`` returns it) back into a URL."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}" if "://" not in path else path


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None, **kwargs: Any):
    fs, path = get_fs(url, storage_options)
    return fs.open(path, mode, **kwargs)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def makedirs(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = get_fs(url, storage_options)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)
    # object stores have no directories: nothing to create


@contextmanager
def atomic_write(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Any]:
    """Open ``url`` for binary writing so that readers never see a partial file.

    Locally: write ``<name>.tmp-<uuid>`` then ``os.replace``. On S3 an object only
    appears when its (multipart) upload completes on close, so a crash leaves nothing
    behind under the final name; an exception aborts the upload.
    """
    fs, path = get_fs(url, storage_options)
    if is_remote(url):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            # s3fs: discard the upload instead of committing what was written so far
            if hasattr(f, "discard"):
                f.discard()
                f.closed = True  # nothing to commit: the upload was aborted
            raise
        else:
            f.close()
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with naming_full_disk(url), open(tmp, "wb") as f:  # ENOSPC/EFBIG: "no space left writing <url>"
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    with atomic_write(url, storage_options) as f:
        f.write(data)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    with open_url(url, "rb", storage_options) as f:
        return f.read()


def list_files(url: str, suffix: str = "", storage_options: dict[str, Any] | None = None) -> list[str]:
    """Files directly under ``url`` (sorted URLs) whose names end with ``suffix``."""
    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=True):
        if entry.get("type") == "file" and entry["name"].endswith(suffix):
            name = posixpath.basename(entry["name"])
            if name.startswith("."):
                continue  # temp files of an atomic write in progress
            out.append(join(url, name))
    return sorted(out)


def list_dirs(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=True):
        if entry.get("type") == "directory":
            out.append(join(url, posixpath.basename(entry["name"].rstrip("/"))))
    return sorted(out)


def versions(url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """``(url, version)`` of the file at ``url``, or of every file under it, from metadata only.

    The version is the ETag on object stores (it changes whenever an object is rewritten) and
    ``size:mtime_ns`` locally; contents are never read. A missing path gives ``[(url, "missing")]``.
    Cache keys built on this see a new, changed or removed file without reading any data.
    """
    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        return [(url, "missing")]
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        return sorted((to_url(fs, p), _version(info)) for p, info in found.items()
                      if not posixpath.basename(p).startswith("."))
    return [(url, _version(fs.info(path)))]


def _version(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{info.get('size')}:{mtime}"


def stat_files(urls: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, tuple[int, str]]:
    """``{url: (size, version)}`` for many files from one listing per folder (metadata only: what
    a planner reads instead of the files). Missing files are absent from the result."""
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        by_dir.setdefault(dirname(u), []).append(u)
    out: dict[str, tuple[int, str]] = {}
    for folder, items in by_dir.items():
        fs, path = get_fs(folder, storage_options)
        fs.invalidate_cache(path)
        try:
            listing = {posixpath.basename(e["name"].rstrip("/")): e for e in fs.ls(path, detail=True)}
        except FileNotFoundError:
            listing = {}
        for u in items:
            info = listing.get(basename(u))
            if info is not None and info.get("type") == "file":
                out[u] = (int(info["size"]), _version(info))
    return out


def file_version(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """(size, version) of one file, as :func:`stat_files` gives it."""
    info = fs.info(path)
    return int(info["size"]), _version(info)
