"""Caption-word classification: the default objective of ``vision_pretrain``.

The tower sees each image whole at its tile size (the view every image mode includes: the first
Dynamic-S2 scale, the ``resize`` tile, the ``dynamic`` thumbnail), its feature map is max-pooled
over positions, and a linear head predicts which of the tokenizer's tokens the caption contains:
one independent logistic output per token (multi-label, as SuperClass classifies captions' subword
tokens), each bias starting at the token's log-odds in the training captions, so that the loss
measures only what the image adds to the word frequencies. A shape word is then a target of its
own, as large in the loss as the colour words, whereas a contrastive loss can tell most captions
of a batch apart by colour and background alone (measured on the demo's scenes, with the same
tower and the same budget: a linear probe reads the shape from the pooled features at 0.81 against
0.54 after SigLIP's sigmoid loss, and the NVILA trained on top names it 0.68-0.70 of the time
against 0.31). Only the tower trains; the projector is trained by the first stage, as in NVILA.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def image_view(model: Any, data: Any) -> torch.Tensor:
    """The whole image at the tower's tile size, normalized as the tower sees it: (3, t, t)."""
    from model.image_processing import load_image, to_tensor

    t = model.config.tile_size
    return to_tensor(load_image(data), (t, t))


def multi_hot(ids: Sequence[list[int]], vocab: int, device: Any = None) -> torch.Tensor:
    hot = torch.zeros(len(ids), vocab, device=device)
    rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(seq) for seq in ids], dtype=torch.long))
    hot[rows.to(hot.device), torch.tensor([i for seq in ids for i in seq], dtype=torch.long, device=hot.device)] = 1.0
    return hot


class WordHead(nn.Module):
    """Pooled tower features -> one logit per token of the vocabulary (thrown away afterwards)."""

    def __init__(self, d_image: int, vocab: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_image, vocab)

    @torch.no_grad()
    def start_at_frequencies(self, ids: Sequence[list[int]]) -> None:
        """Biases at each token's log-odds in ``ids`` (smoothed), weights small: before any step
        the head predicts the word frequencies, whatever the image."""
        freq = (multi_hot(ids, self.linear.out_features).sum(0) + 0.5) / (len(ids) + 1.0)
        self.linear.bias.copy_(torch.log(freq / (1 - freq)).to(self.linear.bias.device))
        self.linear.weight.mul_(0.1)

    def forward(self, model: Any, views: torch.Tensor) -> torch.Tensor:
        feats = model.vision_tower(views)  # (N, g, g, C)
        return self.linear(feats.flatten(1, 2).amax(1).float())


def word_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over the vocabulary, averaged over images."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)


def word_precision(scores: torch.Tensor, ids: Sequence[list[int]]) -> float:
    """Mean over images of the share of the caption's distinct tokens among its ``k`` highest
    scored tokens, ``k`` being their number (1.0: the caption's words, and only they, ranked first)."""
    if not len(ids):
        return float("nan")
    total = 0.0
    for row, seq in zip(scores, ids):
        want = set(seq)
        top = set(row.topk(len(want)).indices.tolist())
        total += len(top & want) / len(want)
    return total / len(ids)


@torch.no_grad()
def heldout_precision(model: Any, head: WordHead, views: Sequence[torch.Tensor], ids: Sequence[list[int]],
                      batch: int = 256) -> float:
    if not len(views):
        return float("nan")
    device = head.linear.weight.device
    scores = torch.cat([head(model, torch.stack(list(views[i: i + batch])).to(device)) for i in range(0, len(views), batch)])
    return word_precision(scores.cpu(), ids)


def frequency_precision(train_ids: Sequence[list[int]], ids: Sequence[list[int]], vocab: int) -> float:
    """The same measure for a guess that ignores the image: every caption gets the training
    captions' most frequent tokens (what the words alone tell)."""
    freq = multi_hot(train_ids, vocab).sum(0)
    return word_precision(freq.expand(len(ids), vocab), ids)
