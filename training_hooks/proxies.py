"""DeltaLoss proxy models, in two modes.

A user without reference models can still prune: ``curate train-proxies`` curates the trusted
shards (and, in reference mode, the pool) into keep-everything manifests, builds NVILAs that
share one tokenizer (so their losses are comparable), trains them with the stage trainer, and
saves them where the DeltaLoss scorer loads them. The models start from random weights, so
they train at ``lr`` (1e-3, not the 1.5e-5 that fine-tunes a pretrained NVILA).

- ``capability`` (NVILA's DeltaLoss): ``<out>/small`` and ``<out>/large``, both on the trusted
  data. DeltaLoss is only a signal when the large proxy is clearly stronger than the small one.
  The large one (``small`` config, about 9x the parameters) trains to convergence (below); the
  small one gets ``steps`` per stage, or with ``converge_small=True`` it too trains to
  convergence, so the gap between them is capacity alone, not training (NVILA's setting; the
  pruning benchmark uses it: otherwise ``delta_loss`` is close to a constant minus ``loss_large``).
- ``reference`` (RHO-LOSS / CoLoR-Filter): ``<out>/pool``, trained on the pool to be pruned,
  and ``<out>/reference``, the same initialization trained on the trusted data, both to
  convergence; the scorer's ``delta_loss`` is then ``loss_pool - loss_reference``.

To convergence: rounds of ``round_steps`` (default ``max(steps, 25)``) until the loss on the
trainer's held-out slice of the model's own training data (kept out of training) stops
improving by ``min_delta`` for ``patience`` rounds, or ``max_rounds`` is reached; the best
round's checkpoint is kept. ``proxies.json`` records the mode and each model's held-out loss,
steps, parameters and seconds (the proxies' training cost).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

from curation.data.shards import dataset_of, list_shards


def seed_manifest(trusted: list[str], work: str, out: str, kinds: dict[str, str] | None = None) -> str:
    """Score the trusted shards with the basic scorer and curate them, keeping every readable
    sample, into a manifest whose datasets feed ``image_sft`` (pairs, videos) and ``pretrain``
    (documents)."""
    from curation.selection.curate import curate
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local

    urls = list_shards(trusted)
    if not urls:
        raise ValueError(f"no trusted shards found in {trusted}")
    tasks = [ShardTask(u, dataset_of(u), (kinds or {}).get(dataset_of(u), "auto")) for u in urls]
    report = score_local(tasks, ScorerSpec("basic"), work)
    if report.failed:
        raise RuntimeError(f"cannot read trusted shards: {[(s.url, s.failed) for s in report.failed]}")
    from curation.scoring.store import ScoreStore

    kinds_seen = dict(ScoreStore(work).con.execute("SELECT dataset, any_value(kind) FROM basic GROUP BY 1").fetchall())
    stages: dict[str, dict[str, float]] = {}
    for ds, kind in kinds_seen.items():
        stages.setdefault("pretrain" if kind == "interleaved" else "image_sft", {})[ds] = 1.0
    manifest, url = curate(work, {"stages": stages}, out, use_ray=False)
    return url


MODES = ("capability", "reference")
DEFAULT_MODE = "capability"  # ranked better in benchmarks/pruning_quality.py (README, DeltaLoss)


def train_proxies(trusted: str | list[str], out: str, *, steps: int = 60, batch_size: int = 8, max_length: int = 512,
                  seed: int = 0, use_ray: bool = False, info: Callable[[str], None] = print, max_rounds: int = 10,
                  round_steps: int | None = None, patience: int = 1, min_delta: float = 0.01,
                  lr: float = 1e-3, mode: str = DEFAULT_MODE, pool: str | list[str] | None = None,
                  converge_small: bool = False, image_mode: str = "dynamic_s2",
                  sizes: tuple[str | dict[str, Any], str | dict[str, Any]] = ("tiny", "small"),
                  small_lr: float | None = None,
                  inits: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    """Train the DeltaLoss scorer's two models under ``out`` and record them in ``proxies.json``.

    ``mode="capability"``: ``small`` and ``large`` on the trusted data (NVILA's DeltaLoss); the
    small one ``steps`` per stage, or to convergence too with ``converge_small``.
    ``mode="reference"``: ``pool`` (a model trained on the ``pool`` shards being pruned) and
    ``reference`` (the same architecture trained on the trusted data), both to convergence.
    ``image_mode``: how the proxies tile an image (``model.config.IMAGE_MODES``). ``sizes``: the
    small and large proxies' model sizes (``training_hooks.bootstrap.SIZES`` names or size specs);
    ``small_lr``: the small proxy's learning rate (default ``lr``: a much narrower model
    takes a larger one to converge in as many steps). ``inits``: model directories the small
    and large proxies start from instead of random weights (``None``: a fresh ``sizes`` model),
    e.g. the large one from an NVILA whose vision tower was pretrained, so that it reads scenes
    the trusted data shows rarely; the fresh proxy takes the given one's tokenizer (two given
    ones must share theirs). Capability mode only."""
    if mode not in MODES:
        raise ValueError(f"unknown proxy mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "reference" and not pool:
        raise ValueError("the reference-model mode needs the pool to be pruned (--pool SHARDS)")
    if mode == "capability" and pool:
        raise ValueError("--pool is only used by the reference-model mode (--mode reference)")
    if mode == "reference" and any(inits):
        raise ValueError("inits (proxies started from given models) are for the capability mode only")
    trusted = [trusted] if isinstance(trusted, str) else list(trusted)
    os.makedirs(out, exist_ok=True)
    manifest_url = seed_manifest(trusted, os.path.join(out, "seed-work"), os.path.join(out, "seed-curated"))
    settings = dict(seed=seed, use_ray=use_ray, batch_size=batch_size, max_length=max_length, lr=lr, info=info,
                    image_mode=image_mode)
    stop = dict(max_rounds=max_rounds, patience=patience, min_delta=min_delta, info=info)
    rounds = round_steps or max(steps, 25)
    if mode == "capability":
        results = _capability(manifest_url, out, steps, rounds, settings, stop, converge_small, sizes, small_lr, inits)
    else:
        pool = [pool] if isinstance(pool, str) else list(pool or [])
        pool_url = seed_manifest(pool, os.path.join(out, "pool-work"), os.path.join(out, "pool-curated"))
        results = _reference(manifest_url, pool_url, out, rounds, settings, stop)
    info("proxies: " + "; ".join(f"{n}: held-out loss {r['heldout_loss']:.3f} after {r['steps']} steps, "
                                 f"{r['parameters']} parameters, {r['seconds']:.0f} s" for n, r in results.items()))
    with open(os.path.join(out, "proxies.json"), "w") as f:
        json.dump({"mode": mode, "manifest": manifest_url, **results}, f, indent=2)
    return results


def _runner(manifest_url: str, n: int, s: dict[str, Any]) -> Callable[[str, str], dict[str, Any]]:
    """Train ``n`` steps per stage of ``manifest_url`` from ``init`` into ``output``."""
    from curation.selection.manifest import load_manifest

    stages = [st.stage for st in load_manifest(manifest_url).stages]

    def run(init: str, output: str) -> dict[str, Any]:
        from training_hooks.kickoff import train_from_manifest

        recipe = {"init": init, "output": output, "seed": s["seed"], "ray": {"enabled": s["use_ray"]},
                  "defaults": {"batch_size": s["batch_size"], "max_length": s["max_length"], "save_every": max(10, n)},
                  "stages": {st: {"steps": n, "lr": s["lr"]} for st in stages}}
        return train_from_manifest(manifest_url, recipe, info=s["info"])
    return run


def _capability(manifest_url: str, out: str, steps: int, rounds: int, s: dict[str, Any],
                stop: dict[str, Any], converge_small: bool = False,
                sizes: tuple[Any, Any] = ("tiny", "small"), small_lr: float | None = None,
                inits: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    """A small proxy (``steps`` per stage, or to convergence) and a larger one (by default ~9x)
    trained to convergence, each from ``inits`` or from random weights."""
    small_init, large_init = (_start(manifest_url, os.path.join(out, f"init-{name}"), size, given, s)
                              for name, size, given in zip(("small", "large"), sizes, inits))
    # one tokenizer for both proxies: a fresh one takes the given one's (else the small one's)
    if all(inits):
        from model.nvila import load_tokenizer

        if load_tokenizer(small_init).get_vocab() != load_tokenizer(large_init).get_vocab():
            raise ValueError("the given small and large proxies use different tokenizers")
    elif inits[1]:
        _share_tokenizer(large_init, small_init)
    else:
        _share_tokenizer(small_init, large_init)
    s_small = dict(s, lr=small_lr or s["lr"])
    small = (_train_to_convergence(_runner(manifest_url, rounds, s_small), small_init, out, "small", **stop)
             if converge_small else _train_small(_runner(manifest_url, steps, s_small), small_init, out))
    results = {"small": small,
               "large": _train_to_convergence(_runner(manifest_url, rounds, s), large_init, out, "large", **stop)}
    for name, init, given in (("small", small_init, inits[0]), ("large", large_init, inits[1])):
        results[name].update(parameters=_parameters(init), init=given or "random")
    return results


def _start(manifest_url: str, dest: str, size: Any, given: str | None, s: dict[str, Any]) -> str:
    """A proxy's starting point at ``dest``: a copy of the model at ``given``, or a fresh ``size`` NVILA."""
    from curation.selection.manifest import load_manifest
    from training_hooks.bootstrap import init_tiny_model

    if given:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(given, dest)
        return dest
    return init_tiny_model(load_manifest(manifest_url), dest, size=size, seed=s["seed"], image_mode=s["image_mode"])


def _reference(manifest_url: str, pool_url: str, out: str, rounds: int, s: dict[str, Any],
               stop: dict[str, Any]) -> dict[str, Any]:
    """One initialization (tiny config, the trusted data's tokenizer), trained to convergence
    once on the pool and once on the trusted data: the two differ only in what they saw."""
    from curation.selection.manifest import load_manifest
    from training_hooks.bootstrap import init_tiny_model

    init = init_tiny_model(load_manifest(manifest_url), os.path.join(out, "init-reference"), size="tiny", seed=s["seed"],
                           image_mode=s["image_mode"])
    results = {"pool": _train_to_convergence(_runner(pool_url, rounds, s), init, out, "pool", **stop),
               "reference": _train_to_convergence(_runner(manifest_url, rounds, s), init, out, "reference", **stop)}
    for r in results.values():
        r["parameters"] = _parameters(init)
    return results


def _share_tokenizer(src: str, dest: str) -> None:
    from model.nvila import load_tokenizer

    if load_tokenizer(src).get_vocab() != load_tokenizer(dest).get_vocab():
        for f in os.listdir(src):
            if f.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(src, f), os.path.join(dest, f))
        _rebuild_with_tokenizer(dest)


def _heldout(report: dict[str, Any]) -> float:
    """Mean held-out loss over the stages and data kinds of one training run."""
    losses = [v for st in report["stages"] for v in (st.get("heldout_loss") or {}).values() if v is not None]
    return sum(losses) / len(losses) if losses else float("nan")


def _summary(report: dict[str, Any], dest: str, seconds: float, steps: int) -> dict[str, Any]:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(report["final_checkpoint"], dest)
    return {"dir": dest, "stages": [(s["stage"], s["first_loss"], s["last_loss"]) for s in report["stages"]],
            "heldout_loss": _heldout(report), "steps": steps, "seconds": round(seconds, 1)}


def _train_small(run: Callable[[str, str], dict[str, Any]], init: str, out: str) -> dict[str, Any]:
    t0 = time.time()
    report = run(init, os.path.join(out, "train-small"))
    return _summary(report, os.path.join(out, "small"), time.time() - t0, sum(s["steps"] for s in report["stages"]))


def _train_to_convergence(run: Callable[[str, str], dict[str, Any]], init: str, out: str, name: str, *,
                          max_rounds: int, patience: int, min_delta: float, info: Callable[[str], None]) -> dict[str, Any]:
    """Rounds of training from the previous round's checkpoint; early stopping on held-out loss."""
    t0 = time.time()
    best, best_loss, best_steps, since_best, steps, rounds = None, float("inf"), 0, 0, 0, []
    prev = init
    for r in range(max(1, max_rounds)):
        report = run(prev, os.path.join(out, f"train-{name}", f"round-{r}"))
        prev = report["final_checkpoint"]
        steps += sum(s["steps"] for s in report["stages"])
        loss = _heldout(report)
        rounds.append(round(loss, 4))
        info(f"{name} proxy round {r}: held-out loss {loss:.4f} (best {best_loss:.4f})")
        if best is None or loss < best_loss - min_delta:  # a NaN loss (no held-out slice) keeps round 0
            best, best_loss, best_steps, since_best = report, loss, steps, 0
        else:
            since_best += 1
            if since_best > patience:
                break
    res = _summary(best, os.path.join(out, name), time.time() - t0, steps)
    # stopped_early False: the round limit came first, so the model may not have converged
    res.update(heldout_by_round=rounds, steps_of_best=best_steps, stopped_early=since_best > patience)
    return res


def _parameters(path: str) -> int:
    from safetensors import safe_open

    n = 0
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                n += sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def _prod(shape: Any) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


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
