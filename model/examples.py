"""Samples -> tokenized conversations: the one rule the trainer and the DeltaLoss scorer share.

- pair: ``<image>`` + prompt -> caption;
- MMC4 document: interleaved text with ``<image>`` before each image's matched sentence
  (loss on the text);
- video: ``<vila/video>`` + prompt -> caption.

A sample that cannot be used (unreadable, no caption, bad media, longer than ``max_length``)
gives ``None`` and is counted in ``skipped`` by reason. Samples are duck-typed (``kind``,
``error``, ``key``, payload fields), as ``curation.data.samples`` defines them.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class ExampleBuilder:
    """Turn samples into tokenized conversations for a model and tokenizer."""

    model: Any
    tokenizer: Any
    max_length: int
    prompts: Sequence[str] = ("Describe the image.",)
    video_prompts: Sequence[str] = ("Describe the video.",)
    skipped: Counter = field(default_factory=Counter)

    def __call__(self, sample: Any) -> Any | None:
        from model.conversation import build_chat, build_pretrain_text

        if sample.error:
            self.skipped["unreadable"] += 1
            return None
        pick = zlib.crc32(sample.key.encode())
        try:
            if sample.kind == "pair":
                if not sample.caption or not sample.caption.strip():
                    self.skipped["no_caption"] += 1
                    return None
                media = [self.model.preprocess_image(_kept(sample.pixels, sample.image))]
                ex = build_chat(self.tokenizer, [
                    {"role": "user", "content": f"<image>\n{self.prompts[pick % len(self.prompts)]}"},
                    {"role": "assistant", "content": sample.caption.strip()}], media,
                    media_lengths=[self._image_len(media[0])])
            elif sample.kind == "video":
                if not sample.caption or not sample.caption.strip():
                    self.skipped["no_caption"] += 1
                    return None
                media = [self.model.preprocess_video(_kept(getattr(sample, "pixels", None) or None, sample.video))]
                ex = build_chat(self.tokenizer, [
                    {"role": "user", "content": f"<vila/video>\n{self.video_prompts[pick % len(self.video_prompts)]}"},
                    {"role": "assistant", "content": sample.caption.strip()}], media,
                    media_lengths=[self._video_len(media[0])])
            else:
                text, names = interleave(sample.text_list, sample.image_info)
                if not text.strip():
                    self.skipped["no_text"] += 1
                    return None
                media = [self.model.preprocess_image(_kept(sample.pixels.get(n), sample.images[n])) for n in names]
                ex = build_pretrain_text(self.tokenizer, text, media, [self._image_len(m) for m in media])
        except ValueError as e:
            self.skipped[f"bad_media: {str(e)[:60]}"] += 1
            return None
        if ex.length > self.max_length:
            self.skipped["too_long"] += 1
            return None
        return ex

    def _image_len(self, media: Any) -> int:
        from model.image_processing import layout_token_count

        c = self.model.config
        return layout_token_count(media.layout, mode=c.image_mode, tile=c.tile_size, patch=c.patch_size,
                                  projector=c.projector_type)

    def _video_len(self, media: Any) -> int:
        from model.image_processing import video_token_count

        c = self.model.config
        return video_token_count(len(media.tiles), c.video_pool_size, tile=c.tile_size, patch=c.patch_size,
                                 projector=c.projector_type)


def interleave(text_list: Sequence[str], image_info: Sequence[dict]) -> tuple[str, list[str]]:
    """MMC4 document -> text with ``<image>`` before each image's matched sentence, and image order."""
    before: dict[int, list[str]] = {}
    for e in image_info:
        before.setdefault(int(e.get("matched_text_index", 0)), []).append(e["image_name"])
    parts, names = [], []
    for i, sent in enumerate(text_list):
        for n in before.get(i, []):
            parts.append("<image>")
            names.append(n)
        parts.append(sent)
    for i in sorted(k for k in before if k >= len(text_list)):  # indexes past the text: at the end
        for n in before[i]:
            parts.append("<image>")
            names.append(n)
    return " ".join(parts), names


def _kept(pixels, data):
    """The image the reader's verification already decoded (scoring keeps it: one decode per
    pass), else its bytes."""
    return pixels if pixels is not None else data
