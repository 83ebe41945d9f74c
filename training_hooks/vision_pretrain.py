"""Pretraining of an NVILA's vision tower on image-text pairs, before the training stages.

NVILA starts from a pretrained SigLIP: its vision tower already tells shapes apart before the
first stage. A tower built from a config (``curate init-model``) has seen nothing, and the
caption loss of the stages teaches it colours quickly but shapes hardly at all: the shape is
one word of ten, and a from-scratch LLM reads the image tokens almost like their mean. This
step stands in for SigLIP's pretraining, on clean pairs (the demo synthesizes its own). Two
objectives:

``words`` (default; ``training_hooks/vision_words.py``): the tower, on each image whole at its
tile size, predicts which tokens its caption contains (caption-word classification). Cheap per
step (one tile per image), so it sees many more pairs for the same time, and every attribute word
is a target of its own.

``sigmoid``: SigLIP's own loss.

- image side: the image's projected tokens (exactly what the LLM will read), max over tokens,
  a linear head, L2-normalized;
- text side: the mean of learned embeddings of the caption's tokens (the NVILA tokenizer), a
  linear head, L2-normalized;
- loss: SigLIP's pairwise sigmoid loss over the batch, ``-log sigmoid(z_ij * (t * x_i.y_j + b))``
  with ``z_ij`` = 1 on the diagonal and -1 elsewhere, ``t`` and ``b`` learned (from 10 and -10).

Batches are built of caption neighbourhoods (hard negatives): each anchor pair comes with
``group - 1`` pairs drawn from the 64 whose captions share most of its tokens (Jaccard over token
sets). Their captions differ in a word or two, often the shape or the position, so the loss can
only be lowered by seeing those; in random batches colour, background and position already tell
almost every caption apart, and the tower learns shapes much more slowly.

The heads are thrown away; the trained parts (the tower; with ``sigmoid`` the projector too) are
saved back into the NVILA directory, with ``vision_pretrain.json``: the loss curve and a held-out
measure before and after (``words``: the share of each caption's tokens among the tokens ranked
first for its image, beside what the word frequencies alone give; ``sigmoid``: image-to-text
top-1 among ``heldout`` pairs, chance 1/heldout).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training_hooks import decoded_pairs as _decoded
from training_hooks.vision_words import (WordHead, frequency_precision, heldout_precision, image_view, multi_hot,
                                        word_loss)

REPORT = "vision_pretrain.json"


class ContrastiveHeads(nn.Module):
    """The throw-away parts: an image head, a bag-of-tokens text tower, SigLIP's t and b."""

    def __init__(self, d_image: int, vocab: int, dim: int = 128) -> None:
        super().__init__()
        self.image = nn.Linear(d_image, dim)
        self.words = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.text = nn.Linear(dim, dim)
        self.log_t = nn.Parameter(torch.tensor(float(np.log(10.0))))
        self.b = nn.Parameter(torch.tensor(-10.0))

    def embed_images(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = torch.stack([t.max(0).values for t in tokens])
        return F.normalize(self.image(pooled.float()), dim=-1)

    def embed_texts(self, ids: Sequence[list[int]]) -> torch.Tensor:
        device = self.b.device
        flat = torch.tensor([i for seq in ids for i in seq], device=device)
        offsets = torch.tensor(np.cumsum([0] + [len(s) for s in ids[:-1]]), device=device)
        return F.normalize(self.text(self.words(flat, offsets)), dim=-1)

    def logits(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        return zi @ zt.T * self.log_t.exp() + self.b


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss, summed over pairs and averaged over images."""
    z = 2 * torch.eye(len(logits), device=logits.device) - 1
    return -F.logsigmoid(z * logits).sum() / len(logits)


def caption_neighbours(ids: Sequence[list[int]], vocab: int, k: int = 64) -> list[list[int]]:
    """For each caption, the ``k`` others with the most similar token sets (Jaccard)."""
    hot = multi_hot(ids, vocab)
    out = []
    for start in range(0, len(ids), 1024):  # in blocks: memory grows with the rows, not their square
        inter = hot[start: start + 1024] @ hot.T
        union = hot[start: start + 1024].sum(1, keepdim=True) + hot.sum(1)[None] - inter
        sim = inter / union.clamp(min=1)
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -1.0  # not itself
        out.extend(sim.topk(min(k, len(ids) - 1), dim=1).indices.tolist())
    return out


def neighbourhood_batch(rng: random.Random, train: Sequence[int], neighbours: dict[int, list[int]], size: int,
                        group: int) -> list[int]:
    """``size`` distinct pairs: anchors drawn at random, each with ``group - 1`` of its neighbours."""
    batch: list[int] = []
    seen: set[int] = set()
    while len(batch) < size:
        anchor = rng.choice(train)
        near = neighbours[anchor]
        for j in [anchor, *rng.sample(near, min(group - 1, len(near)))]:
            if j not in seen and len(batch) < size:
                seen.add(j)
                batch.append(j)
    return batch


def load_pairs(shards: Sequence[str] | str, model: Any, tok: Any,
               view: Callable[[Any, Any], Any] | None = None) -> tuple[list[Any], list[list[int]], Counter]:
    """Every usable pair of the shards as (media, caption token ids); what was skipped, by reason
    (``unreadable``, ``no_caption``, ``bad_media: <why>``). ``view(model, image)`` makes the media
    (default: the model's own preprocessing, every tile)."""
    from curation.data.shards import list_shards, read_shard

    urls = list_shards(shards)
    if not urls:
        raise FileNotFoundError(f"no shards found in {shards}")
    make = view or (lambda m, image: m.preprocess_image(image))
    media, ids, skipped = [], [], Counter()
    for url in urls:
        for s in read_shard(url, kind="pair"):
            if s.error:
                skipped["unreadable"] += 1
                continue
            text = (s.caption or "").strip()
            tokens = tok(text, add_special_tokens=False)["input_ids"] if text else []
            if not tokens:
                skipped["no_caption"] += 1
                continue
            try:
                media.append(make(model, s.image))
            except ValueError as e:  # labelled as the trainer's ExampleBuilder labels it
                skipped[f"bad_media: {str(e)[:60]}"] += 1
                continue
            ids.append(tokens)
    return media, ids, skipped


def _decoded_pairs(decoded: dict[str, Any], tok: Any) -> tuple[list[Any], list[list[int]], Counter]:
    """``load_pairs`` of pairs read and decoded beforehand (``training_hooks.decoded_pairs``): the same
    samples, skipped for the same reasons, the same views."""
    views, media, ids, skipped = decoded["views"], [], [], Counter()
    for i, (caption, unreadable, bad) in enumerate(zip(decoded["captions"], decoded["unreadable"], decoded["bad_media"])):
        if unreadable:
            skipped["unreadable"] += 1
            continue
        text = caption.strip()
        tokens = tok(text, add_special_tokens=False)["input_ids"] if text else []
        if not tokens:
            skipped["no_caption"] += 1
        elif bad:
            skipped[f"bad_media: {bad[1:]}"] += 1  # "!<why>"
        else:
            media.append(views[i])
            ids.append(tokens)
    return media, ids, skipped


@torch.no_grad()
def retrieval_accuracy(model: Any, heads: ContrastiveHeads, media: Sequence[Any], ids: Sequence[list[int]]) -> float:
    """Image-to-text top-1 among the given pairs."""
    if not media:
        return float("nan")
    device = heads.b.device
    zi = heads.embed_images(model.encode_media([m.to(device) for m in media]))
    zt = heads.embed_texts(ids)
    return float((heads.logits(zi, zt).argmax(1) == torch.arange(len(media), device=device)).float().mean())


def _train(params: list[Any], loss_of: Callable[[list[int]], torch.Tensor], model: Any, batches: Any, steps: int,
           lr: float, info: Callable[[str], None], world: int = 1) -> list[dict[str, Any]]:
    """AdamW with warmup and cosine decay over ``params``; the loss curve. With ``world`` > 1
    data-parallel ranks (``training_hooks.vision_parallel``) ``loss_of`` gives this rank's share
    of the batch's loss; DDP averages the gradients, so each rank steps on ``world`` times its share."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    curve = []
    model.train()
    for step in range(1, steps + 1):
        loss = loss_of(next(batches))
        opt.zero_grad(set_to_none=True)
        (loss * world if world > 1 else loss).backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 20) == 0 or step == steps:
            value = _batch_loss(loss, world)
            curve.append({"step": step, "loss": round(value, 4)})
            info(f"vision pretraining: step {step}/{steps} loss {value:.3f}")
    return curve


def _batch_loss(share: torch.Tensor, world: int) -> float:
    if world == 1:
        return share.item()
    import torch.distributed as dist

    total = share.detach().clone()
    dist.all_reduce(total)
    return total.item()


OBJECTIVES = ("words", "sigmoid")


def _words(model: Any, media: list[Any], ids: list[list[int]], train: list[int], held: list[int], vocab: int,
           device: Any) -> tuple[list[Any], Callable, Callable[[], dict[str, float]]]:
    """(parameters, loss of a batch, held-out measure) of caption-word classification."""
    head = WordHead(model.vision_tower.hidden_size, vocab).to(device)
    head.start_at_frequencies([ids[i] for i in train])
    held_views, held_ids = [media[i] for i in held], [ids[i] for i in held]
    words_alone = frequency_precision([ids[i] for i in train], held_ids, vocab)

    def loss_of(batch: list[int]) -> torch.Tensor:
        views = torch.stack([media[i] for i in batch]).to(device)
        return word_loss(head(model, views), multi_hot([ids[i] for i in batch], vocab, device))

    def measure() -> dict[str, float]:
        return {"heldout_word_precision": round(heldout_precision(model, head, held_views, held_ids), 4),
                "words_alone": round(words_alone, 4)}

    return [*model.vision_tower.parameters(), *head.parameters()], loss_of, measure, head


def _sigmoid(model: Any, media: list[Any], ids: list[list[int]], train: list[int], held: list[int], vocab: int,
             device: Any) -> tuple[list[Any], Callable, Callable[[], dict[str, float]]]:
    """(parameters, loss of a batch, held-out measure) of SigLIP's sigmoid loss."""
    heads = ContrastiveHeads(model.llm.config.hidden_size, vocab).to(device)
    held_media, held_ids = [media[i] for i in held], [ids[i] for i in held]

    def loss_of(batch: list[int]) -> torch.Tensor:
        zi = heads.embed_images(model.encode_media([media[i].to(device) for i in batch]))
        return sigmoid_loss(heads.logits(zi, heads.embed_texts([ids[i] for i in batch])))

    def measure() -> dict[str, float]:
        return {"heldout_retrieval_top1": round(retrieval_accuracy(model, heads, held_media, held_ids), 4),
                "chance": round(1 / max(1, len(held)), 4)}

    params = [*model.vision_tower.parameters(), *model.projector.parameters(), *heads.parameters()]
    return params, loss_of, measure, None


def data_parallel_workers(objective: str, workers: int) -> int:
    """The processes a pretraining runs on: ``workers`` for ``words`` on a CPU, else one."""
    return workers if objective == "words" and not torch.cuda.is_available() else 1


def pretrain_vision(model_dir: str, shards: Sequence[str] | str, *, objective: str = "words", steps: int = 3000,
                    batch_size: int = 128, lr: float = 2e-3, heldout: int = 128, group: int = 16, seed: int = 0,
                    info: Callable[[str], None] = lambda s: None, workers: int = 1, ranks: Any = None) -> dict[str, Any]:
    """Pretrain ``model_dir``'s vision tower (``sigmoid``: and projector) on the pairs in ``shards``
    with ``objective``; save it back into ``model_dir`` and return (and write) the report.
    ``workers`` > 1 (``words`` on CPU): that many data-parallel processes, one batch split between them,
    the spawned ones started first (or beforehand by the caller: ``ranks``, a ``vision_parallel.SpawnedRanks``)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown vision pretraining objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if steps < 1 or batch_size < 2:
        raise ValueError("vision pretraining needs steps >= 1 and batch_size >= 2")
    kwargs = dict(objective=objective, steps=steps, batch_size=batch_size, lr=lr, heldout=heldout, group=group, seed=seed,
                  info=info, workers=data_parallel_workers(objective, workers))
    if kwargs["workers"] > 1 and ranks is None:
        from training_hooks.vision_parallel import SpawnedRanks

        with SpawnedRanks(kwargs["workers"]) as started:  # their start-up overlaps reading the pairs
            return _pretrain(model_dir, shards, ranks=started, **kwargs)
    return _pretrain(model_dir, shards, ranks=ranks if kwargs["workers"] > 1 else None, **kwargs)


def _pretrain(model_dir: str, shards: Sequence[str] | str, *, objective: str, steps: int, batch_size: int, lr: float,
              heldout: int, group: int, seed: int, info: Callable[[str], None], workers: int, ranks: Any) -> dict[str, Any]:
    from model import NVILAForCausalLM
    from model.nvila import load_tokenizer

    t0 = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = NVILAForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    decoded = _decoded.load(shards, model.config.tile_size) if objective == "words" and isinstance(shards, str) else None
    media, ids, skipped = (_decoded_pairs(decoded, tok) if decoded is not None
                           else load_pairs(shards, model, tok, image_view if objective == "words" else None))
    order = list(range(len(media)))
    rng.shuffle(order)
    held = order[:min(heldout, len(order) // 5)]
    train = order[len(held):]
    if len(train) < batch_size:
        raise ValueError(f"vision pretraining needs at least {batch_size} usable training pairs; "
                         f"{len(train)} found in {shards} (skipped: {dict(skipped) or 'none'})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    params, loss_of, measure, head = (_words if objective == "words" else _sigmoid)(model, media, ids, train, held,
                                                                                   len(tok), device)
    before = measure()
    if workers > 1:
        from training_hooks.vision_parallel import train_words_parallel

        curve = train_words_parallel(model_dir, model, head, media, ids, train, rng, vocab=len(tok), steps=steps,
                                     batch_size=batch_size, lr=lr, workers=workers, info=info, ranks=ranks)
    else:
        curve = _train(params, loss_of, model, _batches(rng, objective, ids, train, len(tok), batch_size, group), steps,
                       lr, info)
    model.eval()
    after = measure()
    model.to("cpu").save_pretrained(model_dir, tok)
    report = {"model": model_dir, "objective": objective, "pairs": len(media), "train_pairs": len(train),
              "heldout_pairs": len(held), "skipped": dict(skipped), "steps": steps, "batch_size": batch_size,
              "group": group if objective == "sigmoid" else None, "lr": lr, "heldout": {"before": before, "after": after},
              "curve": curve, "seconds": round(time.time() - t0, 1),
              "workers": workers}
    with open(os.path.join(model_dir, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    return report


def describe(report: dict[str, Any]) -> str:
    """One sentence on a pretraining report (the CLI and the demo report say it)."""
    before, after = report["heldout"]["before"], report["heldout"]["after"]
    how = (f"{report['steps']} steps of {report['batch_size']} on {report['train_pairs']} clean pairs in "
           f"{report['seconds']} s")
    if report.get("objective", "sigmoid") == "words":
        return (f"the vision tower learned to tell which words a caption holds from the image alone ({how}): "
                f"of each held-out caption's tokens, {before['heldout_word_precision']:.1%} -> "
                f"**{after['heldout_word_precision']:.1%}** are among the tokens it ranks first "
                f"(the word frequencies alone: {after['words_alone']:.1%}; {report['heldout_pairs']} held-out pairs)")
    return (f"the vision tower was pretrained contrastively, SigLIP's sigmoid loss ({how}): held-out image-to-text "
            f"top-1 among {report['heldout_pairs']} pairs {before['heldout_retrieval_top1']:.1%} -> "
            f"**{after['heldout_retrieval_top1']:.1%}** (chance {after['chance']:.1%})")


def _batches(rng: random.Random, objective: str, ids: list[list[int]], train: list[int], vocab: int, size: int,
             group: int) -> Any:
    """Random batches; for ``sigmoid`` with ``group`` > 1, caption neighbourhoods (held-out pairs never enter)."""
    if objective == "words" or group <= 1:
        while True:
            yield rng.sample(train, size)
    train_set = set(train)
    neighbours = {i: [j for j in near if j in train_set]
                  for i, near in zip(range(len(ids)), caption_neighbours(ids, vocab)) if i in train_set}
    while True:
        yield neighbourhood_batch(rng, train, neighbours, size, group)
