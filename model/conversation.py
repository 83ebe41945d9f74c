"""Chat template and tokenization with labels on answer tokens only.

The template is Qwen2's ChatML::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\nDescribe the image.<|im_end|>\\n
    <|im_start|>assistant\\na red circle on a blue background<|im_end|>\\n

Only the assistant's answers and their closing ``<|im_end|>`` carry labels; the system
prompt, user turns, media tokens and padding are ``-100``. For interleaved pretraining
text (MMC4) every text token is a label and media tokens are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from model.config import IMAGE_TOKEN, VIDEO_TOKEN
from model.nvila import IGNORE_INDEX, Media

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class SequenceTooLong(ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    media: list[Media]
    num_media_tokens: int = 0  # LLM positions the media will take once spliced

    @property
    def length(self) -> int:
        """Sequence length after splicing (text tokens - media placeholders + media tokens)."""
        return len(self.input_ids) - len(self.media) + self.num_media_tokens


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def count_media_tokens(text: str) -> int:
    return text.count(IMAGE_TOKEN) + text.count(VIDEO_TOKEN)


def build_chat(tokenizer: Any, turns: Sequence[dict[str, str]], media: Sequence[Media] = (),
               system: str | None = SYSTEM_PROMPT, add_generation_prompt: bool = False,
               media_lengths: Sequence[int] = ()) -> Example:
    """Tokenize a conversation: turns alternate ``user`` / ``assistant`` (``content`` may hold
    ``<image>`` / ``<vila/video>`` placeholders, one per media item, in order)."""
    n_placeholders = sum(count_media_tokens(t["content"]) for t in turns)
    if n_placeholders != len(media):
        raise ValueError(f"the conversation has {n_placeholders} media tokens but {len(media)} media were given")
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, train: bool) -> None:
        t = _ids(tokenizer, text)
        ids.extend(t)
        labels.extend(t if train else [IGNORE_INDEX] * len(t))

    if system:
        add(f"{IM_START}system\n{system}{IM_END}\n", False)
    for i, turn in enumerate(turns):
        role = turn["role"]
        if role not in ("user", "assistant"):
            raise ValueError(f"turn {i}: role must be user or assistant, got {role!r}")
        add(f"{IM_START}{role}\n", False)
        if role == "assistant":
            if count_media_tokens(turn["content"]):
                raise ValueError(f"turn {i}: media tokens belong in user turns")
            add(turn["content"] + IM_END, True)
            add("\n", False)
        else:
            add(turn["content"] + f"{IM_END}\n", False)
    if add_generation_prompt:
        add(f"{IM_START}assistant\n", False)
    return Example(ids, labels, list(media), sum(media_lengths))


def build_pretrain_text(tokenizer: Any, text: str, media: Sequence[Media] = (), media_lengths: Sequence[int] = ()) -> Example:
    """Interleaved text with media placeholders; every text token is a label (EOS appended)."""
    n = count_media_tokens(text)
    if n != len(media):
        raise ValueError(f"the text has {n} media tokens but {len(media)} media were given")
    ids = _ids(tokenizer, text) + [tokenizer.convert_tokens_to_ids(IM_END)]
    media_ids = set(tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN]))
    labels = [IGNORE_INDEX if t in media_ids else t for t in ids]
    return Example(ids, labels, list(media), sum(media_lengths))


def collate(examples: Sequence[Example], pad_id: int, max_length: int | None = None) -> dict[str, Any]:
    """Right-pad a batch; refuse sequences that cannot fit ``max_length`` after splicing."""
    if max_length is not None:
        for i, ex in enumerate(examples):
            if ex.length > max_length:
                raise SequenceTooLong(f"example {i} needs {ex.length} positions (with media) but the sequence "
                                      f"length is {max_length}")
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "media": [list(e.media) for e in examples]}
