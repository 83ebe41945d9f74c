"""The public Python API: the names a notebook imports from the package tops. Deep module paths
may move; these names may not (the README documents them)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import curation
import scorers

PUBLIC_CURATION = {
    "read_shard": "curation.data.shards",
    "list_shards": "curation.data.shards",
    "ShardWriter": "curation.data.writer",
    "ScoringPlan": "curation.scoring.plan",
    "load_score_recipe": "curation.scoring.recipe",
    "ScorerSpec": "curation.scoring.engine",
    "ShardTask": "curation.scoring.engine",
    "run_scoring": "curation.scoring.engine",
    "score_local": "curation.scoring.engine",
    "ScoreStore": "curation.scoring.store",
    "Policy": "curation.selection.policy",
    "load_policy": "curation.selection.policy",
    "run_selection": "curation.selection.policy",
    "select": "curation.selection.curate",
    "curate": "curation.selection.curate",
    "ReshardConfig": "curation.selection.reshard",
    "Manifest": "curation.selection.manifest",
    "load_manifest": "curation.selection.manifest",
    "build_scorer": "scorers",
    "scorer_names": "scorers",
}
PUBLIC_SCORERS = ["Prepared", "Scorer", "build_scorer", "plugin_scorers", "register_scorer", "scorer_class",
                  "scorer_names", "ENTRY_POINT_GROUP"]


def test_every_public_name_imports_from_the_package_top():
    assert set(PUBLIC_CURATION) <= set(curation.__all__)
    for name, module in PUBLIC_CURATION.items():
        assert getattr(curation, name) is getattr(importlib.import_module(module), name), name
    from curation import ScoreStore, curate, load_policy, read_shard, run_selection  # noqa: F401 - the issue's line
    assert set(PUBLIC_SCORERS) <= set(scorers.__all__)
    for name in PUBLIC_SCORERS:
        assert getattr(scorers, name) is not None


def test_unknown_name_is_an_attribute_error():
    try:
        curation.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("curation.no_such_thing did not raise")


def test_importing_the_package_top_loads_no_heavy_dependency():
    probe = "import sys, curation, scorers; print(sorted(m for m in ('ray', 'torch', 'duckdb', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_api_reads_scores_and_selects(noisy_corpus, tmp_path):
    """The notebook path end to end with the top-level names: read, score, query, select."""
    from curation import ScorerSpec, ScoreStore, ShardTask, list_shards, load_policy, read_shard, run_selection, score_local

    corpus, _ = noisy_corpus
    urls = list_shards(f"{corpus}/coyo_synth")
    assert sum(1 for _ in read_shard(urls[0])) == 25
    work = str(tmp_path / "work")
    report = score_local([ShardTask(u, "coyo_synth", "pair") for u in urls[:1]], ScorerSpec("basic"), work)
    assert not report.failed
    store = ScoreStore(work)
    assert store.count("basic") == 25
    result = run_selection(store, load_policy({"defaults": [{"rule": "valid"}]}))
    assert 0 < result.kept_total() < 25
