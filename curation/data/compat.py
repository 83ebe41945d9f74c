"""Open our shards with the ecosystem's own readers, on S3 too.

``webdataset``'s ``gopen`` knows no ``s3://``; :func:`register_fsspec_with_webdataset`
teaches it to open ``s3://`` (and any other fsspec protocol) through fsspec, honouring
``AWS_ENDPOINT_URL`` like the rest of the service. :func:`ray_filesystem` gives
``ray.data.read_webdataset`` a pyarrow filesystem for the same URLs.
"""

from __future__ import annotations

import sys
from typing import Any

from curation.data import storage

FSSPEC_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    return storage.open_url(url, mode)


def register_fsspec_with_webdataset(protocols: tuple[str, ...] = FSSPEC_PROTOCOLS) -> None:
    """Make ``webdataset.WebDataset("s3://...")`` open shards through fsspec."""
    import webdataset  # noqa: F401 - ensures webdataset.gopen is imported

    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    for p in protocols:
        schemes[p] = _gopen_fsspec


def webdataset_reader(urls: str | list[str], **kwargs: Any):
    """A ``webdataset.WebDataset`` over local or fsspec URLs (members left as bytes)."""
    import webdataset as wds

    register_fsspec_with_webdataset()
    kwargs.setdefault("shardshuffle", False)
    kwargs.setdefault("empty_check", False)
    return wds.WebDataset(urls, **kwargs)


def ray_filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """A pyarrow filesystem for ``ray.data.read_*`` over this URL (None for local paths)."""
    if not storage.is_remote(url):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = storage.get_fs(url, storage_options)
    return PyFileSystem(FSSpecHandler(fs))


def ray_paths(urls: list[str]) -> list[str]:
    """Strip the scheme from URLs for a ray read that is given an explicit filesystem."""
    return [u.split("://", 1)[1] if storage.is_remote(u) else u for u in urls]


def ray_read_webdataset(urls: list[str], storage_options: dict[str, Any] | None = None, **kwargs: Any):
    """``ray.data.read_webdataset`` over local or fsspec URLs, members kept as raw bytes.

    Samples of one dataset may carry different members (``jpg`` in one, ``png`` in the
    next); Ray would try to cast such byte columns to tensors and fail, so that casting
    is turned off for this read.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_tensor_extension_casting = False
    kwargs.setdefault("decoder", False)
    return ray.data.read_webdataset(ray_paths(urls), filesystem=ray_filesystem(urls[0], storage_options), **kwargs)
