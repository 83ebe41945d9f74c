"""Streaming, kind-aware WebDataset shard readers, from any fsspec URL: the reading API.

:func:`read_shard` streams a shard's tar records (``curation.data.records``) and builds one
typed sample per key (``curation.data.builders``). It yields exactly one record per key it
finds; a sample it cannot read still comes out, with ``error`` set. The names below are
re-exported so that readers need one import.
"""

from __future__ import annotations

from typing import Any, Iterator

from curation.data.builders import DEFAULT_MAX_PIXELS, MediaError, ReadOptions, to_sample
from curation.data.records import (
    ShardChangedError,
    ShardDigest,
    ShardError,
    ShardInfo,
    checksum_algo,
    count_samples,
    dataset_of,
    file_checksum,
    iter_raw_samples,
    list_shards,
    open_shard,
    shard_info,
    shard_name,
    split_key,
    unsafe_name,
)
from curation.data.samples import Sample

__all__ = ["read_shard", "ReadOptions", "MediaError", "DEFAULT_MAX_PIXELS", "ShardChangedError", "ShardDigest", "ShardError", "ShardInfo", "checksum_algo", "count_samples",
           "dataset_of", "file_checksum", "iter_raw_samples", "list_shards", "open_shard", "shard_info", "shard_name",
           "split_key", "unsafe_name"]


def read_shard(
    url: str,
    kind: str = "auto",
    dataset: str | None = None,
    *,
    verify: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_options: dict[str, Any] | None = None,
    options: ReadOptions | None = None,
    digest: ShardDigest | None = None,
) -> Iterator[Sample]:
    """Stream the samples of one shard (local path or any fsspec URL).

    Yields one typed sample per key; unreadable samples carry ``error``. A tar that is
    truncated or corrupt yields every sample complete before the damage, then the damaged
    sample with the error, and stops. A shard with no sample to carry an error (empty,
    not a tar) raises :class:`ShardError`; one that cannot be opened raises ``OSError``.
    With ``digest`` the shard is hashed as it is read (``digest.checksum`` once the last sample is out).
    """
    opts = options or ReadOptions(kind=kind, verify=verify, max_pixels=max_pixels)
    ds = dataset or dataset_of(url)
    name = shard_name(url)
    with open_shard(url, storage_options, digest) as f:
        try:
            for raw in iter_raw_samples(f, opts.max_member_bytes):
                yield to_sample(raw, ds, name, url, opts)
        except ShardError as e:
            raise ShardError(f"shard {url}: {e}") from None
        if digest is not None:
            digest.finish()
