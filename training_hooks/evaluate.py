"""Evaluating an NVILA checkpoint: held-out loss, and caption accuracy on synthetic data."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from training_hooks.device import to_device

IGNORE_INDEX = -100


@torch.no_grad()
def mean_token_loss(model: Any, examples: Sequence[Any], pad_id: int, batch_size: int = 8) -> float:
    """Mean loss over all label tokens of ``examples`` (not a mean of batch means, so the
    figure does not depend on the batch size)."""
    from model.conversation import collate

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(list(examples[i: i + batch_size]), pad_id)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if not n:
            continue
        out = model(**to_device(batch, device), num_items_in_batch=torch.tensor(1.0, device=device))  # summed
        total += float(out.loss)
        count += n
    return total / count if count else float("nan")
