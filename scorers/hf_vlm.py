"""Hugging Face image-text-to-text models (Qwen2-VL, SmolVLM / Idefics3, LLaVA-OneVision, ...)
as DeltaLoss models.

A directory whose config names a model type transformers maps to ``AutoModelForImageTextToText``
is loaded with it and its ``AutoProcessor``. Each sample becomes a conversation in the model's own
chat template:

- pair: user = the image and a prompt, assistant = the caption;
- video: user = the clip's frames as images (``video_frames`` of them, evenly sampled) and a
  prompt, assistant = the caption (frames as images work for every family, SmolVLM's included);
- document: user = an instruction, assistant = the document with its images where they belong.

The loss is taken over the assistant turn only, and of it only the ordinary text tokens: image
placeholders and the tokenizer's special / added tokens (turn ends, tile markers) are not scored.
Batches are sized by a token budget (padded tokens per forward pass), so long documents or
videos go in small batches. On a GPU the model runs in bf16.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

DOC_PROMPT = "Write the document."


def is_image_text_to_text(path: str) -> bool:
    """Whether ``path`` holds a transformers model of an image-text-to-text family."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except (OSError, ValueError):
        return False


@dataclass
class VLMItem:
    """One sample as a conversation: its text in the chat template, its images, the number of
    tokens before the answer and in all (images expanded as the processor expands them)."""

    text: str
    images: list[Any]
    prefix_len: int
    length: int
    skip: set[int] = field(default_factory=set, repr=False)


class HFVLM:
    def __init__(self, path: str, device: str, max_length: int, token_budget: int, video_frames: int = 4) -> None:
        self.path, self.device, self.max_length = path, device, max_length
        self.token_budget, self.video_frames = token_budget, video_frames
        self.model: Any = None
        self.processor: Any = None
        self.tokenizer: Any = None
        self.skip: set[int] = set()

    def load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "right"  # answer positions are counted from the left
        cfg = self.model.config
        self.skip = set(self.tokenizer.all_special_ids) | set(self.tokenizer.get_added_vocab().values())
        self.skip |= {i for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
                      if i is not None}

    # ---- samples -> conversations
    def _messages(self, sample: Any, prompt: str, video_prompt: str) -> tuple[list[dict], list[Any], int]:
        """(messages, images, images in the user turn)."""
        from model.examples import interleave
        from model.image_processing import load_image, video_frames

        if sample.kind == "pair":
            images = [load_image(sample.image).convert("RGB")]
            user = [{"type": "image"}, {"type": "text", "text": prompt}]
            return [{"role": "user", "content": user}, _answer(sample.caption)], images, 1
        if sample.kind == "video":
            images = [f.convert("RGB") for f in video_frames(sample.video, self.video_frames)]
            user = [{"type": "image"} for _ in images] + [{"type": "text", "text": video_prompt}]
            return [{"role": "user", "content": user}, _answer(sample.caption)], images, len(images)
        text, names = interleave(sample.text_list, sample.image_info)
        content, images = [], []
        for i, part in enumerate(text.split("<image>")):
            if i:
                content.append({"type": "image"})
                images.append(load_image(sample.images[names[i - 1]]).convert("RGB"))
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        user = {"role": "user", "content": [{"type": "text", "text": DOC_PROMPT}]}
        return [user, {"role": "assistant", "content": content}], images, 0

    def _count(self, text: str, images: list[Any]) -> int:
        enc = self.processor(text=[text], images=[images] if images else None, return_tensors="pt")
        return int(enc["input_ids"].shape[1])

    def build(self, sample: Any, prompt: str, video_prompt: str) -> VLMItem:
        """The sample's conversation; ValueError (with the reason) where it cannot be scored."""
        if sample.kind in ("pair", "video") and not (sample.caption and sample.caption.strip()):
            raise ValueError("no caption")
        messages, images, in_prompt = self._messages(sample, prompt, video_prompt)
        if sample.kind == "interleaved" and not any(c["type"] == "text" for c in messages[1]["content"]):
            raise ValueError("no text")
        full = self.processor.apply_chat_template(messages, tokenize=False)
        prefix = self.processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prefix):
            raise ValueError("the chat template does not start the answer where the prompt ends")
        item = VLMItem(full, images, self._count(prefix, images[:in_prompt]), self._count(full, images))
        if item.length > self.max_length:
            raise ValueError(f"too long ({item.length} tokens > max_length {self.max_length})")
        return item

    # ---- losses
    def batches(self, items: Sequence[VLMItem | None]) -> list[list[int]]:
        """Indexes grouped so that (items x longest) stays within the token budget; items with
        and without images are not mixed (processors batch images per sample)."""
        idx = sorted((i for i, x in enumerate(items) if x is not None), key=lambda i: (bool(items[i].images), items[i].length))
        out: list[list[int]] = []
        for i in idx:
            cur = out[-1] if out else None
            if (cur and bool(items[cur[0]].images) == bool(items[i].images)
                    and (len(cur) + 1) * items[i].length <= self.token_budget):
                cur.append(i)
            else:
                out.append([i])
        return out

    def losses(self, items: Sequence[VLMItem | None]) -> list[tuple[float, int] | None]:
        import torch

        res: list[tuple[float, int] | None] = [None] * len(items)
        for chunk in self.batches(items):
            batch = [items[i] for i in chunk]
            images = [x.images for x in batch] if batch[0].images else None
            enc = self.processor(text=[x.text for x in batch], images=images, padding=True, return_tensors="pt")
            ids = enc["input_ids"]
            labels = torch.full_like(ids, -100)
            for b, x in enumerate(batch):
                answer = ids[b, x.prefix_len:x.length]
                keep = torch.tensor([int(t) not in self.skip for t in answer.tolist()], dtype=torch.bool)
                labels[b, x.prefix_len:x.length] = torch.where(keep, answer, torch.full_like(answer, -100))
            inputs = {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in enc.items() if hasattr(v, "to")}
            with torch.inference_mode():
                logits = self.model(**inputs).logits
                labels = labels.to(logits.device)
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                       ignore_index=-100, reduction="none")
                valid = labels[:, 1:] != -100
                n = valid.sum(1)
                mean = (lp * valid).sum(1) / n.clamp_min(1)
            for k, i in enumerate(chunk):
                res[i] = (float(mean[k]), int(n[k])) if int(n[k]) > 0 else None
        return res


def _answer(caption: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": caption.strip()}]}
