"""Data Filtering Network training: a CLIP model trained only on trusted pairs.

As in DFN, a filter model is an ordinary CLIP trained with the contrastive loss on a
small, high-quality set; its image-text cosine then ranks a large noisy pool. The model
is saved as an OpenCLIP directory (``open_clip_config.json`` + ``open_clip_model.safetensors``)
that :class:`scorers.clip.ClipScorer` loads by path.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from curation.data.shards import list_shards, read_shard


@dataclass
class FilterTrainConfig:
    model: str = "tiny-clip"  # an open_clip config name (built in or shipped in scorers/clip_configs)
    steps: int = 600
    max_minutes: float | None = None  # stop early when this much time has passed
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    shuffle_buffer: int = 2048
    torch_threads: int | None = None


@dataclass
class FilterTrainReport:
    out_dir: str
    steps: int
    seconds: float
    samples_seen: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    skipped_samples: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stream_pairs(shards: list[str], seed: int, buffer: int, counter: dict[str, int]) -> Iterator[tuple[Any, str]]:
    """Endless shuffled stream of (PIL image, caption) from readable pair samples."""
    from PIL import Image

    rng = random.Random(seed)
    buf: list[tuple[Any, str]] = []
    while True:
        order = list(shards)
        rng.shuffle(order)
        produced = 0
        for url in order:
            for s in read_shard(url, kind="pair"):
                if s.error or not s.caption:
                    counter["skipped"] += 1
                    continue
                buf.append((Image.open(io.BytesIO(s.image)).convert("RGB"), s.caption))
                produced += 1
                if len(buf) >= buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        if produced == 0 and not buf:
            raise ValueError(f"no readable, captioned pairs in the trusted shards: {shards}")
        rng.shuffle(buf)
        while len(buf) > buffer // 2:
            yield buf.pop()


def _new_model(cfg: FilterTrainConfig) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, train-time preprocessing, tokenizer, model config) of a freshly initialised CLIP."""
    import open_clip
    import torch

    from scorers.clip import register_configs

    register_configs()
    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model config {cfg.model!r}")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
    return model, preprocess_train, open_clip.get_tokenizer(cfg.model), model_cfg


def _optimizer(model: Any, cfg: FilterTrainConfig) -> Any:
    """AdamW as CLIP trains: no weight decay on gains, biases and the logit scale."""
    import torch

    def decayed(n: str, p: Any) -> bool:
        return p.ndim >= 2 and "logit_scale" not in n

    decay = [p for n, p in model.named_parameters() if decayed(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decayed(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def _lr_at(cfg: FilterTrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to zero at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, t)))


def _step(model: Any, opt: Any, loss_fn: Any, images: Any, texts: Any, lr: float) -> float:
    """One contrastive step; returns the loss."""
    import torch

    for g in opt.param_groups:
        g["lr"] = lr
    out = model(images, texts)
    if isinstance(out, dict):  # models created with output_dict=True
        img_f, txt_f, scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:  # (image_features, text_features, logit_scale.exp())
        img_f, txt_f, scale = out[:3]
    loss = loss_fn(img_f, txt_f, scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.item())


def train_filter(
    trusted: str | list[str],
    out_dir: str,
    config: FilterTrainConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> FilterTrainReport:
    """Train a CLIP filter on trusted pair shards and save it to ``out_dir``."""
    import open_clip
    import torch

    from scorers.clip import save_open_clip_dir

    cfg = config or FilterTrainConfig()
    shards = list_shards(trusted)
    if not shards:
        raise ValueError(f"no trusted shards found in {trusted}")
    model, preprocess_train, tokenizer, model_cfg = _new_model(cfg)
    opt, loss_fn = _optimizer(model, cfg), open_clip.ClipLoss()
    counter = {"skipped": 0}
    stream = _stream_pairs(shards, cfg.seed, cfg.shuffle_buffer, counter)
    model.train()
    losses: list[float] = []
    t0 = time.time()
    for step in range(cfg.steps):
        if cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60:
            break
        batch = [next(stream) for _ in range(cfg.batch_size)]
        images = torch.stack([preprocess_train(im) for im, _ in batch])
        losses.append(_step(model, opt, loss_fn, images, tokenizer([c for _, c in batch]), _lr_at(cfg, step)))
        if progress:
            progress(step + 1, losses[-1])
    model.eval()
    save_open_clip_dir(model, model_cfg, out_dir, {"size": model_cfg["vision_cfg"]["image_size"]})
    report = FilterTrainReport(
        out_dir=out_dir, steps=len(losses), seconds=round(time.time() - t0, 1), samples_seen=len(losses) * cfg.batch_size,
        final_loss=float(np.mean(losses[-10:])) if losses else float("nan"), losses=[round(x, 4) for x in losses],
        skipped_samples=counter["skipped"], config=asdict(cfg),
    )
    with open(os.path.join(out_dir, "train_report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    return report


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate_filter(model_dir: str, shards: str | list[str], ground_truth: Any, batch_size: int = 128,
                    negatives: tuple[str, ...] = ("mismatched_caption",)) -> dict[str, Any]:
    """Score held-out pair shards with a filter; ROC AUC of clean vs injected mismatches.

    ``ground_truth`` is the synthetic corpus's table (polars DataFrame with dataset, key, noise).
    """
    from scorers.clip import ClipScorer

    scorer = ClipScorer(model_dir, batch_size=batch_size)
    scorer.setup()
    truth = {(r["dataset"], r["key"]): r["noise"] for r in ground_truth.iter_rows(named=True)}
    pos, neg = [], []
    for url in list_shards(shards):
        batch: list[Any] = []
        for s in read_shard(url, kind="pair"):
            batch.append(s)
        cols = scorer.score(batch)
        for s, score in zip(batch, cols["clip_score"]):
            if score is None:
                continue
            noise = truth.get((s.dataset, s.key))
            if noise == "clean":
                pos.append(score)
            elif noise in negatives:
                neg.append(score)
    return {"roc_auc": roc_auc(np.array(pos), np.array(neg)), "clean": len(pos), "negatives": len(neg),
            "clean_mean": float(np.mean(pos)), "negative_mean": float(np.mean(neg))}
