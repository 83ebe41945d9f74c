"""The curation service: read, score, select and write training data for NVILA-style VLMs.

Floors, bottom up (each imports only from those below it; ``tests/test_layers.py`` checks):

- ``curation.common``: helpers every floor shares (YAML loader, Ray connection, read-ahead);
- ``curation.data``: storage over fsspec, tar records, typed samples, shard reader and writer;
- (``model``, ``scorers``: the NVILA model and the scorers, outside this package);
- ``curation.scoring``: recipes resolved into a plan, the Ray scoring engine, the score store;
- ``curation.corpus``: the synthetic corpus and the MMC4 import;
- ``curation.selection``: rules and policies compiled to SQL, resharding, the manifest;
- (``training_hooks``, ``flows``: training from a manifest, Prefect orchestration);
- ``curation.app``: the ``curate`` command line.
"""
