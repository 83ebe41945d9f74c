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

from curation.data.diskfull import NoSpaceError, is_disk_full, no_space


# Retries against object stores, set here and nowhere else (README, "Faults"). botocore retries
# what it can see as a failed request (5xx, throttling such as 503 SlowDown, connection errors
# and timeouts), with backoff; s3fs retries around it what botocore cannot see: a body cut in
# the middle of a read (it asks again for the same byte range) and SlowDown answers that
# outlived botocore's attempts. Overrides, in order of precedence: ``storage_options``
# (``config_kwargs={"retries": {...}}``, ``retries=``), then the environment: botocore's own
# ``AWS_RETRY_MODE`` and ``AWS_MAX_ATTEMPTS``, and ``CURATION_S3FS_RETRIES`` for s3fs.
S3_RETRY_MODE = "standard"  # botocore: "standard", "adaptive" (adds client-side rate limiting) or "legacy"
S3_MAX_ATTEMPTS = 5  # botocore: attempts per request, the first one included
S3FS_RETRIES = 5  # s3fs: attempts per call around botocore's (ranged reads included)
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30


def s3_retry_settings() -> dict[str, Any]:
    """The retry settings S3 clients get when ``storage_options`` say nothing about them."""
    return {
        "mode": os.environ.get("AWS_RETRY_MODE") or S3_RETRY_MODE,
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS),
        "s3fs_retries": int(os.environ.get("CURATION_S3FS_RETRIES") or S3FS_RETRIES),
    }


def _s3_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs = dict(opts.get("client_kwargs") or {})
        client_kwargs.setdefault("endpoint_url", endpoint)
        opts["client_kwargs"] = client_kwargs
    retry = s3_retry_settings()
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"mode": retry["mode"], "max_attempts": retry["max_attempts"]})
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    config.setdefault("read_timeout", S3_READ_TIMEOUT_S)
    opts["config_kwargs"] = config
    # s3fs takes its retry count as an attribute, not a constructor argument (see get_fs)
    opts.setdefault("retries", retry["s3fs_retries"])
    return opts


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL; local paths come back absolute."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if is_remote(url):
        if not url.startswith(("s3://", "s3a://")):
            return url_to_fs(url, **dict(storage_options or {}))
        opts = _s3_options(storage_options)
        retries = int(opts.pop("retries"))
        fs, path = url_to_fs(url, **opts)
        fs.retries = retries
        return fs, path
    fs, path = url_to_fs(os.path.abspath(os.path.expanduser(url)))
    return fs, path


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def named_error(e: OSError, url: str) -> OSError:
    """``e`` with the object's URL and the store's last answer in its message (s3fs's message alone,
    e.g. "Please reduce your request rate.", names neither the object nor the call)."""
    if url in str(e):
        return e
    cause = e.__cause__ or e.__context__
    msg = e.strerror or str(e)
    last = str(cause) if cause is not None and msg in str(cause) else msg  # botocore's: code, call, retries
    err = OSError(e.errno, f"{url}: {last}") if e.errno is not None else OSError(f"{url}: {last}")
    err.__cause__ = e
    return err


@contextmanager
def naming(url: str) -> Iterator[None]:
    """Raise the I/O errors inside the block named after ``url``: an object store's (see
    :func:`named_error`), and a local full disk's as ``no space left writing <url>``
    (:mod:`curation.data.diskfull`). "Not found" and "already exists" are answers, not faults:
    left as they are, as is any other local error."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, NoSpaceError):
        raise
    except OSError as e:
        if is_remote(url):
            raise named_error(e, url) from e
        if is_disk_full(e):
            raise no_space(url, e) from e
        raise


class NamedReader:
    """A binary file whose I/O errors name its URL (what :func:`open_url` gives for a remote
    object, and :func:`atomic_write` for a remote upload: a multipart part that fails in
    ``write``). Everything else is the wrapped file's."""

    def __init__(self, f: Any, url: str) -> None:
        self._f, self.url = f, url

    def read(self, n: int = -1) -> bytes:
        with naming(self.url):
            return self._f.read(n)

    def readinto(self, b: Any) -> int:
        with naming(self.url):
            return self._f.readinto(b)

    def seek(self, *args: Any) -> int:
        with naming(self.url):
            return self._f.seek(*args)

    def write(self, data: Any) -> int:
        with naming(self.url):
            return self._f.write(data)

    def flush(self) -> None:
        with naming(self.url):
            self._f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "NamedReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


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
    """Open ``url``; a remote object open for binary reading raises I/O errors named after it."""
    fs, path = get_fs(url, storage_options)
    with naming(url):
        f = fs.open(path, mode, **kwargs)
    return NamedReader(f, url) if is_remote(url) and mode == "rb" else f


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    with naming(url):
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
        with naming(url):
            f = fs.open(path, "wb")
        try:
            yield NamedReader(f, url)  # a part upload that fails in write() names the object
        except BaseException:
            # s3fs: discard the upload instead of committing what was written so far
            if hasattr(f, "discard"):
                f.discard()
                f.closed = True  # nothing to commit: the upload was aborted
            raise
        else:
            try:
                with naming(url):
                    f.close()  # the (final part of the) upload: the object appears here or not at all
            except BaseException:
                if hasattr(f, "discard"):
                    f.discard()  # a multipart upload the store never completed: abort it
                f.closed = True
                raise
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with naming(url), open(tmp, "wb") as f:  # ENOSPC/EFBIG: "no space left writing <url>"
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
    if not exists(url, storage_options):
        return []
    out = []
    with naming(url):
        listing = fs.ls(path, detail=True)
    for entry in listing:
        if entry.get("type") == "file" and entry["name"].endswith(suffix):
            name = posixpath.basename(entry["name"])
            if name.startswith("."):
                continue  # temp files of an atomic write in progress
            out.append(join(url, name))
    return sorted(out)


def list_dirs(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    fs, path = get_fs(url, storage_options)
    with naming(url):
        if not fs.exists(path):
            return []
        listing = fs.ls(path, detail=True)
    out = []
    for entry in listing:
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
            with naming(folder):
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
    with naming(to_url(fs, path)):
        info = fs.info(path)
    return int(info["size"]), _version(info)
