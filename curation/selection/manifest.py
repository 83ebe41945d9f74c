"""The curated manifest: one content-addressed JSON document per curation run.

It lists what went in (input shards with sizes and checksums or ETags), how it was judged
(scorer identities, the policy and the SQL it compiled to), what came out (kept and dropped
counts per dataset and reason, output shards and their wids indexes), and which datasets
feed which NVILA training stage with what mixture weight. Training starts from a manifest
and nothing else.

Its ``id`` is the SHA-256 of its canonical JSON without the ``id`` and ``created_at``
fields: the same inputs, scores and policy give the same id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from curation.data import storage
from curation.selection.policy import STAGES

MANIFEST_VERSION = 1


class InputShardRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    size: Optional[int] = None
    checksum: str  # md5 of local files, ETag on object stores
    samples: int  # rows scored for this shard


class ScorerRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    config_hash: str
    identity: dict[str, Any]


class DatasetSelection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    scored: int
    kept: int
    dropped: dict[str, int]

    @model_validator(mode="after")
    def _accounted(self) -> "DatasetSelection":
        if self.kept + sum(self.dropped.values()) != self.scored:
            raise ValueError(f"kept {self.kept} + dropped {sum(self.dropped.values())} != scored {self.scored}")
        return self


class OutputShard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    nsamples: int
    filesize: int
    md5sum: str


class RefusedSample(BaseModel):
    """A sample the policy kept but resharding did not write (an unsafe member path, a link...)."""

    model_config = ConfigDict(extra="forbid")
    shard: str
    key: str
    reason: str


class OutputDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    samples: int
    index: Optional[str]
    shards: list[OutputShard]
    refused: list[RefusedSample] = Field(default_factory=list)


class StageData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["align", "vision_pretrain", "pretrain", "image_sft", "video_sft"]
    datasets: dict[str, float]  # dataset -> mixture weight


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_version: int = MANIFEST_VERSION
    id: str = ""
    created_at: str = ""
    parent: Optional[str] = None  # id of the manifest this one replaced at the same place (a nightly lineage)
    work: str
    inputs: dict[str, list[InputShardRef]]
    scorers: list[ScorerRef]
    policy: dict[str, Any]
    policy_fingerprint: str
    policy_sql: str
    selection: dict[str, DatasetSelection]
    decisions: str  # the decision table (every scored sample, dropped_by NULL when kept)
    outputs: dict[str, OutputDataset]
    reshard: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageData] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        for st in self.stages:
            for ds in st.datasets:
                if ds not in self.outputs:
                    raise ValueError(f"stage {st.stage} uses dataset {ds!r} which has no curated output")
        for ds, out in self.outputs.items():
            sel = self.selection.get(ds)
            if sel is not None and out.samples + len(out.refused) != sel.kept:
                raise ValueError(f"dataset {ds}: {out.samples} samples written and {len(out.refused)} refused, "
                                 f"but {sel.kept} kept")
        return self

    def content_hash(self) -> str:
        data = self.model_dump(mode="json", exclude={"id", "created_at", "parent"})
        for out in data["outputs"].values():
            if not out["refused"]:
                del out["refused"]  # manifests written before refusals were recorded keep their id
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def with_id(self) -> "Manifest":
        self.id = self.content_hash()[:32]
        return self

    def verify_id(self) -> None:
        if self.id != self.content_hash()[:32]:
            raise ValueError(f"manifest id {self.id} does not match its content (edited after it was written?)")

    def stage_datasets(self, stage: str) -> dict[str, float]:
        for st in self.stages:
            if st.stage == stage:
                return dict(st.datasets)
        return {}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def load_manifest(url: str, storage_options: dict[str, Any] | None = None, verify: bool = True) -> Manifest:
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"manifest not found: {url}")
    m = Manifest.model_validate_json(storage.read_bytes(url, storage_options))
    if verify:
        m.verify_id()
    return m


def write_manifest(m: Manifest, url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``m`` to ``url``; a different manifest already there becomes its parent.

    The replaced manifest is kept as ``manifests/<id>.json`` beside ``url``, so a nightly lineage
    can be followed back (``curate manifest show --lineage``). Rewriting the same content (same
    id) keeps the existing parent.
    """
    if storage.exists(url, storage_options):
        try:
            old = load_manifest(url, storage_options, verify=False)
        except (ValueError, FileNotFoundError):
            old = None  # unreadable: nothing to link to (it is still replaced atomically)
        # any other OSError (a store that keeps failing) propagates: writing on would lose the parent
        if old is not None and old.id == m.id:
            m.parent = old.parent
        elif old is not None and old.id:
            storage.write_bytes(archived_url(url, old.id), old.to_json().encode(), storage_options)
            m.parent = old.id
    storage.write_bytes(url, m.to_json().encode(), storage_options)
    return url


def archived_url(url: str, manifest_id: str) -> str:
    return storage.join(storage.dirname(url), "manifests", f"{manifest_id}.json")


def lineage(url: str, storage_options: dict[str, Any] | None = None, limit: int = 100) -> list[Manifest]:
    """The manifest at ``url`` followed by its ancestors, newest first, as far as they were kept."""
    chain = [load_manifest(url, storage_options)]
    while chain[-1].parent and len(chain) < limit:
        prev = archived_url(url, chain[-1].parent)
        if not storage.exists(prev, storage_options):
            break
        chain.append(load_manifest(prev, storage_options))
    return chain


def build_manifest(
    *,
    work: str,
    inputs: dict[tuple[str, str], dict[str, Any]],
    sizes: dict[str, int],
    scorers: dict[str, list[dict[str, Any]]],
    policy: Any,
    selection: Any,
    reshard_result: Any,
    reshard_cfg: dict[str, Any],
) -> Manifest:
    import time

    by_ds: dict[str, list[InputShardRef]] = {}
    for (ds, _shard), rec in sorted(inputs.items()):
        by_ds.setdefault(ds, []).append(InputShardRef(url=rec["url"], size=sizes.get(rec["url"]), checksum=rec["checksum"],
                                                      samples=rec["rows"]))
    outputs = {}
    for ds, out in reshard_result.datasets.items():
        outputs[ds] = OutputDataset(kind=selection.counts[ds]["kind"], samples=out["samples"], index=out["index"],
                                    shards=[OutputShard(url=s["url"], nsamples=s["nsamples"], filesize=s["filesize"],
                                                        md5sum=s["md5sum"]) for s in out["shards"]],
                                    refused=[RefusedSample(shard=r["shard"], key=r["key"], reason=r["reason"])
                                             for r in out.get("refused", [])])
    m = Manifest(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        work=work,
        inputs=by_ds,
        scorers=[ScorerRef(name=n, **ident) for n, idents in sorted(scorers.items()) for ident in idents],
        policy=policy.model_dump(mode="json"),
        policy_fingerprint=policy.fingerprint(),
        policy_sql=selection.sql,
        selection={ds: DatasetSelection(**c) for ds, c in selection.counts.items()},
        decisions=selection.decisions_url,
        outputs=outputs,
        reshard=reshard_cfg,
        stages=[StageData(stage=s, datasets=mix) for s, mix in policy.stages.items() if s in STAGES],
    )
    return m.with_id()


def summarize(m: Manifest) -> str:
    lines = [f"manifest {m.id}  (created {m.created_at}; parent {m.parent or '-'})", f"work: {m.work}",
             f"policy {m.policy_fingerprint}; scorers: " + ", ".join(f"{s.name}[{s.config_hash}]" for s in m.scorers), ""]
    lines.append(f"{'dataset':<16}{'kind':<13}{'inputs':>7}{'scored':>8}{'kept':>8}{'shards':>8}  dropped by")
    for ds, sel in m.selection.items():
        out = m.outputs.get(ds)
        dropped = ", ".join(f"{k}={v}" for k, v in sel.dropped.items()) or "-"
        lines.append(f"{ds:<16}{sel.kind:<13}{len(m.inputs.get(ds, [])):>7}{sel.scored:>8}{sel.kept:>8}"
                     f"{len(out.shards) if out else 0:>8}  {dropped}")
    for ds, out in m.outputs.items():
        for r in out.refused:
            lines.append(f"not written: {ds}/{r.shard} sample {r.key!r}: {r.reason}")
    if m.stages:
        lines.append("")
        for st in m.stages:
            lines.append(f"stage {st.stage:<16}" + ", ".join(f"{d} x{w:g}" for d, w in st.datasets.items()))
    return "\n".join(lines)
