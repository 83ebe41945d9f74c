"""MemoBuild (training_hooks/data.py): a stage builds each sample's example once, over its epochs."""

from collections import Counter

import torch

from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from curation.data.shards import list_shards, read_shard
from model.examples import ExampleBuilder
from training_hooks.bootstrap import init_tiny_model
from training_hooks.data import MemoBuild


class _Counting:
    def __init__(self, build):
        self.build, self.calls, self.skipped = build, 0, build.skipped

    def __call__(self, sample):
        self.calls += 1
        return self.build(sample)


def test_later_epochs_reuse_examples_and_count_skips_as_before(tmp_path):
    from model import NVILAForCausalLM
    from model.nvila import load_tokenizer

    synthesize(str(tmp_path / "c"), SynthConfig(seed=3, datasets=[DatasetSpec("p", "pair", 24, {"empty_caption": 0.2,
                                                                                                  "corrupt_image": 0.1}, 24)]))
    samples = [s for url in list_shards([str(tmp_path / "c" / "p")]) for s in read_shard(url)]

    class _M:  # init_tiny_model wants a manifest only for its captions
        outputs = {}

    init = init_tiny_model(_M(), str(tmp_path / "m"), prompts=tuple(s.caption for s in samples if s.caption))
    model, tok = NVILAForCausalLM.from_pretrained(init), load_tokenizer(init)
    plain, counted = ExampleBuilder(model, tok, 512), _Counting(ExampleBuilder(model, tok, 512))
    memo = MemoBuild(counted)
    for epoch in range(3):
        for s in samples:
            a, b = plain(s), memo(s)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.input_ids == b.input_ids and a.labels == b.labels
                assert all(torch.equal(x.tiles, y.tiles) for x, y in zip(a.media, b.media))
    assert counted.calls == len(samples)  # built once, reused in epochs 2 and 3
    assert plain.skipped == counted.skipped and sum(plain.skipped.values()) >= 3 * 2  # skips counted every epoch
    # with no room for media, every sample with an image is built every time
    none_kept = _Counting(ExampleBuilder(model, tok, 512))
    memo0 = MemoBuild(none_kept, limit=0)
    for s in samples + samples:
        memo0(s)
    kept_free = sum(1 for s in samples if plain(s) is None)  # skipped ones keep no media
    assert none_kept.calls == 2 * len(samples) - kept_free
    assert isinstance(none_kept.skipped, Counter)
