"""DeltaLoss proxy models: a small and a large NVILA trained on a trusted seed set.

A user without reference models can still prune: ``curate train-proxies`` curates the trusted
shards into a keep-everything manifest, builds a small and a large NVILA (``tiny`` and
``small`` configs, one tokenizer for both so their losses are comparable), trains both with
the stage trainer on the same data, and saves them where the DeltaLoss scorer loads them
(``<out>/small``, ``<out>/large``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from curation.shards import dataset_of, list_shards


def seed_manifest(trusted: list[str], work: str, out: str, kinds: dict[str, str] | None = None) -> str:
    """Score the trusted shards with the basic scorer and curate them, keeping every readable
    sample, into a manifest whose datasets feed ``image_sft`` (pairs, videos) and ``pretrain``
    (documents)."""
    from curation.curate import curate
    from curation.engine import ScorerSpec, ShardTask, score_local

    urls = list_shards(trusted)
    if not urls:
        raise ValueError(f"no trusted shards found in {trusted}")
    tasks = [ShardTask(u, dataset_of(u), (kinds or {}).get(dataset_of(u), "auto")) for u in urls]
    report = score_local(tasks, ScorerSpec("basic"), work)
    if report.failed:
        raise RuntimeError(f"cannot read trusted shards: {[(s.url, s.failed) for s in report.failed]}")
    from curation.store import ScoreStore

    kinds_seen = dict(ScoreStore(work).con.execute("SELECT dataset, any_value(kind) FROM basic GROUP BY 1").fetchall())
    stages: dict[str, dict[str, float]] = {}
    for ds, kind in kinds_seen.items():
        stages.setdefault("pretrain" if kind == "interleaved" else "image_sft", {})[ds] = 1.0
    manifest, url = curate(work, {"stages": stages}, out, use_ray=False)
    return url


def train_proxies(trusted: str | list[str], out: str, *, steps: int = 60, batch_size: int = 8, max_length: int = 512,
                  seed: int = 0, use_ray: bool = False, info: Callable[[str], None] = print) -> dict[str, Any]:
    from curation.manifest import load_manifest
    from training_hooks.bootstrap import init_tiny_model
    from training_hooks.kickoff import train_from_manifest

    trusted = [trusted] if isinstance(trusted, str) else list(trusted)
    os.makedirs(out, exist_ok=True)
    manifest_url = seed_manifest(trusted, os.path.join(out, "seed-work"), os.path.join(out, "seed-curated"))
    m = load_manifest(manifest_url)
    results = {}
    small_init = init_tiny_model(m, os.path.join(out, "init-small"), size="tiny", seed=seed)
    # one tokenizer for both proxies: the large one is built with the small one's vocabulary
    large_init = init_tiny_model(m, os.path.join(out, "init-large"), size="small", seed=seed)
    from model.nvila import load_tokenizer

    if load_tokenizer(small_init).get_vocab() != load_tokenizer(large_init).get_vocab():
        for f in os.listdir(small_init):
            if f.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(small_init, f), os.path.join(large_init, f))
        _rebuild_with_tokenizer(large_init)
    stages = {st.stage: {"steps": steps} for st in m.stages}
    for name, init in (("small", small_init), ("large", large_init)):
        recipe = {"init": init, "output": os.path.join(out, f"train-{name}"), "seed": seed, "ray": {"enabled": use_ray},
                  "defaults": {"batch_size": batch_size, "max_length": max_length, "save_every": max(10, steps)},
                  "stages": stages}
        report = train_from_manifest(manifest_url, recipe, info=info)
        dest = os.path.join(out, name)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(report["final_checkpoint"], dest)
        results[name] = {"dir": dest, "stages": [(s["stage"], s["first_loss"], s["last_loss"]) for s in report["stages"]]}
    with open(os.path.join(out, "proxies.json"), "w") as f:
        json.dump({"manifest": manifest_url, **results}, f, indent=2)
    return results


def _rebuild_with_tokenizer(path: str) -> None:
    """Re-create the model at ``path`` for the tokenizer now saved there (same architecture)."""
    import torch

    from model import NVILAConfig, NVILAForCausalLM
    from model.nvila import load_tokenizer

    tok = load_tokenizer(path)
    cfg = NVILAConfig.load(os.path.join(path, "config.json"))
    cfg.llm_config = dict(cfg.llm_config, vocab_size=len(tok))
    cfg.image_token_id = cfg.video_token_id = cfg.sep_token_id = None
    torch.manual_seed(0)
    model = NVILAForCausalLM(cfg)
    model.attach_tokenizer(tok)
    model.save_pretrained(path, tok)
