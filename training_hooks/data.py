"""From a manifest's curated shards to training batches.

Streaming (local or S3, through the shard reader), deterministic shuffling (shard order and a
shuffle buffer, seeded by stage, epoch, rank and worker), weighted mixing across datasets by
the manifest's weights. Training splits one mixed stream across data-parallel ranks by sample
(``example_stream``); ``stream_samples`` can also split by shard for readers that want it. Every sample becomes a conversation
(`model.examples`, the rules the DeltaLoss scorer shares):

- pair: ``<image>`` + prompt -> caption;
- MMC4 document: interleaved text with ``<image>`` before each image's matched sentence
  (pretraining: loss on the text);
- video: ``<vila/video>`` + prompt -> caption.

A sample that cannot be used (unreadable, no caption, too long for ``max_length``) is skipped
and counted; a held-out slice (every n-th key by hash) is kept out of training for evaluation.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from curation.data.shards import read_shard


@dataclass
class DataSplit:
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def total(self) -> int:
        return self.world_size * self.num_workers


@dataclass
class SourceDataset:
    name: str
    kind: str
    urls: list[str]
    weight: float
    heldout_every: int | None = None  # every n-th key (by hash) is held out of training


def key_bucket(dataset: str, key: str, n: int) -> int:
    return zlib.crc32(f"{dataset}/{key}".encode()) % n


def stream_samples(src: SourceDataset, seed: int, split: DataSplit, *, heldout: bool | None = None,
                   shuffle_buffer: int = 256, loop: bool = True) -> Iterator[Any]:
    """Samples of one dataset for this rank/worker, shuffled, epoch after epoch (``loop``).

    ``heldout=False`` leaves out the held-out slice (training), ``True`` yields only it
    (evaluation), ``None`` yields everything."""
    heldout_every = src.heldout_every if heldout is not None else None
    epoch = 0
    while True:
        rng = random.Random(f"{seed}:{src.name}:{epoch}:{split.index}")
        urls = list(src.urls)
        random.Random(f"{seed}:{src.name}:{epoch}").shuffle(urls)  # same order on every rank
        by_shard = len(urls) >= split.total
        mine = urls[split.index::split.total] if by_shard else urls
        buf: list[Any] = []
        n = 0
        for url in mine:
            for s in read_shard(url, kind=src.kind, dataset=src.name):
                n += 1
                if not by_shard and (n - 1) % split.total != split.index:
                    continue
                if heldout_every:
                    is_held = key_bucket(src.name, s.key, heldout_every) == 0
                    if is_held != heldout:
                        continue
                buf.append(s)
                if len(buf) >= shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf
        epoch += 1
        if not loop:
            return


def mix(streams: dict[str, Iterator[Any]], weights: dict[str, float], seed: int) -> Iterator[tuple[str, Any]]:
    """Draw from each stream with probability proportional to its weight (deterministic by seed)."""
    names = sorted(streams)
    total = sum(weights[n] for n in names)
    cum, acc = [], 0.0
    for n in names:
        acc += weights[n] / total
        cum.append(acc)
    rng = random.Random(f"mix:{seed}")
    while True:
        u = rng.random()
        for n, c in zip(names, cum):
            if u < c or n == names[-1]:
                try:
                    yield n, next(streams[n])
                except StopIteration:
                    return
                break


def batches(examples: Iterator[tuple[int, Any]], batch_size: int, pad_id: int, max_length: int) -> Iterator[dict]:
    """Batches of ``(position, example)`` pairs (as ``example_stream`` yields them). Each batch
    dict gets two entries beside the model inputs, which the trainer pops: ``position`` (the
    stream position after its last example, where a resumed run continues) and ``llm_tokens``
    (positions the LLM processes, media included)."""
    from model.conversation import collate

    buf, pos = [], 0
    for pos, ex in examples:
        buf.append(ex)
        if len(buf) == batch_size:
            batch = collate(buf, pad_id, max_length)
            batch["position"] = pos
            batch["llm_tokens"] = sum(e.length for e in buf)
            yield batch
            buf = []


def stage_sources(manifest: Any, datasets: dict[str, float], heldout_every: int = 20,
                  heldout_samples: int = 32) -> list[SourceDataset]:
    """The stage's datasets. The held-out slice is every ``heldout_every``-th key, or a larger
    share for small datasets so that about ``heldout_samples`` are held out."""
    out = []
    for ds, w in sorted(datasets.items()):
        o = manifest.outputs[ds]
        every = max(2, min(heldout_every, o.samples // max(1, heldout_samples)))
        out.append(SourceDataset(ds, o.kind, [s.url for s in o.shards], w, every))
    return out


def epoch_samples(manifest: Any, sources: list[SourceDataset]) -> int:
    """Training samples in one epoch over the stage's mixture: each dataset's curated samples
    (the manifest's count, less its held-out slice) times its mixture weight, summed. A weight
    of 0.5 reads half of that dataset per epoch, 2.0 reads it twice."""
    total = 0.0
    for src in sources:
        n = manifest.outputs[src.name].samples
        held = n / src.heldout_every if src.heldout_every else 0.0
        total += src.weight * (n - held)
    return max(1, round(total))


def steps_for_epochs(epochs: float, samples_per_epoch: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps that read ``epochs`` epochs of ``samples_per_epoch`` samples, each step
    taking ``batch_size`` samples on each of ``world_size`` ranks (at least one step)."""
    return max(1, math.ceil(epochs * samples_per_epoch / (batch_size * world_size)))


def stage_total_steps(plan: Any, manifest: Any, sources: list[SourceDataset], world_size: int = 1) -> int:
    """A stage's optimizer steps: its ``steps`` when the recipe fixes them; otherwise its ``epochs``
    (default 1) over the stage's mixture as the manifest counts it, in steps of the global batch."""
    if plan.steps:
        return plan.steps
    return steps_for_epochs(plan.epochs or 1.0, epoch_samples(manifest, sources), plan.batch_size, world_size)


MEMO_BYTES = 256 * 2**20  # media tensors a stage keeps for its later epochs (the demo's stages: ~60 MB)


class MemoBuild:
    """``build`` (an ``ExampleBuilder``) at most once per sample: the example of a sample is the
    same every epoch (no augmentation; the prompt is picked by key), so a stage that reads its data
    for many epochs preprocesses and tokenizes each sample once. Examples are kept until their media
    reach ``limit`` bytes (later samples are built each time, as without it); a skipped sample is
    counted in the builder's ``skipped`` again each time it comes, as without it."""

    def __init__(self, build: Callable[[Any], Any], limit: int = MEMO_BYTES) -> None:
        self.build, self.limit, self.bytes = build, limit, 0
        self.skipped: Counter | None = getattr(build, "skipped", None)
        self.kept: dict[tuple, tuple[Any, Counter]] = {}

    def __call__(self, sample: Any) -> Any:
        ident = getattr(sample, "identity", None)
        if ident in self.kept:
            ex, skips = self.kept[ident]
            if self.skipped is not None:
                self.skipped.update(skips)
            return ex
        before = Counter(self.skipped) if self.skipped is not None else Counter()
        ex = self.build(sample)
        size = sum(m.tiles.nbytes for m in ex.media) if ex is not None else 0
        if ident is not None and self.bytes + size <= self.limit:
            self.bytes += size
            self.kept[ident] = (ex, (self.skipped - before) if self.skipped is not None else Counter())
        return ex


def example_stream(sources: list[SourceDataset], build: Callable[[Any], Any], seed: int, rank: int = 0,
                   world_size: int = 1, start: int = 0, counts: Counter | None = None) -> Iterator[tuple[int, Any]]:
    """This rank's training examples, as ``(position after it, example)``.

    One mixed sample stream is defined for the whole job (the same on every rank, by seed); rank
    ``r`` of ``n`` takes its samples ``r, r + n, r + 2n, ...`` (the distributed sampler's split).
    So the ``n`` ranks' batches of a step together hold what one worker with ``n`` times the batch
    would see. ``start`` resumes at a position this function yielded before: the samples before
    it are read but not turned into examples.
    """
    streams = {s.name: stream_samples(s, seed, DataSplit(), heldout=False) for s in sources}
    for position, (name, sample) in enumerate(mix(streams, {s.name: s.weight for s in sources}, seed)):
        if position < start or position % world_size != rank:
            continue
        ex = build(sample)
        if ex is not None:
            if counts is not None:
                counts[name] += 1
            yield position + 1, ex
