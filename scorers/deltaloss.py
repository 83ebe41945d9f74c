"""DeltaLoss (NVILA, Eq. 1): how much more a large model learned from a sample than a small one.

For each sample x, over its answer (caption) tokens::

    delta(x) = mean_t [log p_large(x_t) - log p_small(x_t)] = loss_small(x) - loss_large(x)

Near 0: both models agree (too easy, or hopeless). Negative: the small model fits it and the
large does not (distracting). Positive: helpful. Keep the top K within each sub-dataset.

Reference-model mode (``pool=`` and ``reference=`` instead of ``small=`` and ``large=``; RHO-LOSS,
CoLoR-Filter): the same columns with the pool model (trained on the pool being pruned) on the
``small`` side and the reference model (trained on trusted data) on the ``large`` side, so
``delta_loss = loss_pool - loss_reference``: high where trusted data taught the reference
something the pool did not teach the pool model (the long tail); low for what the pool repeats
(its model already fits it) and for noise (the reference model finds it unlikely).

Models: any NVILA directory (ours or VILA's three-folder layout; samples become the same
conversations the trainer builds); any transformers image-text-to-text directory (Qwen2-VL,
SmolVLM, LLaVA-OneVision, ...: ``scorers.hf_vlm``, prompts in the model's own chat template,
batches sized by ``token_budget``); or, for text-only scoring, any ``transformers`` causal LM
directory (the caption / document text is scored on its own). Both models are loaded on the
same worker and run on the same batches. Two models of different families tokenize differently:
they need ``separate_tokenization: true``.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from typing import Any, Sequence

import pyarrow as pa

from scorers.base import Prepared, Scorer, dir_sha256
from scorers.clip_pixels import PRECISIONS, autocast, effective_precision

log = logging.getLogger(__name__)


def _is_nvila(path: str) -> bool:
    from model.vila_layout import is_vila_dir

    if is_vila_dir(path):
        return True
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") == "nvila"
    except (OSError, ValueError):
        return False


class _Side:
    """One model (small or large) with its tokenizer and the way samples become its inputs."""

    def __init__(self, path: str, device: str, max_length: int, token_budget: int = 8192) -> None:
        self.path = path
        self.device = device
        self.max_length = max_length
        self.nvila = _is_nvila(path)
        self.vlm: Any = None
        if not self.nvila:
            from scorers.hf_vlm import HFVLM, is_image_text_to_text

            if is_image_text_to_text(path):
                self.vlm = HFVLM(path, device, max_length, token_budget)
        self.model: Any = None
        self.tokenizer: Any = None

    @property
    def multimodal(self) -> bool:
        return self.nvila or self.vlm is not None

    def load(self) -> None:
        # no global torch state is touched here: scoring runs under torch.inference_mode()
        if self.vlm is not None:
            self.vlm.load()
            self.model, self.tokenizer = self.vlm.model, self.vlm.tokenizer
            return
        if self.nvila:
            from model import NVILAForCausalLM
            from model.nvila import load_tokenizer

            self.model = NVILAForCausalLM.from_pretrained(self.path)
            self.tokenizer = load_tokenizer(self.path)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(self.path)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def sample_text(sample: Any) -> str | None:
    if sample.kind == "interleaved":
        return " ".join(sample.text_list) if sample.text_list else None
    return sample.caption


def _mode(small: str | None, large: str | None, pool: str | None, reference: str | None) -> str:
    """``capability`` (small and large) or ``reference`` (pool and reference); anything else is refused."""
    if small is not None and large is not None and pool is None and reference is None:
        return "capability"
    if pool is not None and reference is not None and small is None and large is None:
        return "reference"
    raise ValueError("DeltaLoss needs either small and large models (capability gap, NVILA) or pool and "
                     "reference models (reference-model mode), not a mix")


class DeltaLossScorer(Scorer):
    name = "deltaloss"
    version = "1"

    def __init__(self, small: str | None = None, large: str | None = None, *, pool: str | None = None,
                 reference: str | None = None, device: str = "cpu", batch_size: int = 16, max_length: int = 1024,
                 separate_tokenization: bool = False, prompts: Sequence[str] = ("Describe the image.",),
                 video_prompts: Sequence[str] = ("Describe the video.",), token_budget: int = 8192,
                 precision: str = "auto") -> None:
        self.mode = _mode(small, large, pool, reference)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        # auto: bf16 autocast on CUDA, fp32 on a CPU (as the clip scorer); the losses are taken in fp32
        self.precision = effective_precision(precision, device)
        if self.mode == "reference":
            small, large = pool, reference
        assert small is not None and large is not None  # _mode checked
        for what, p in ((("small", small), ("large", large)) if self.mode == "capability"
                        else (("pool", small), ("reference", large))):
            if not os.path.isfile(os.path.join(p, "config.json")):
                raise FileNotFoundError(f"DeltaLoss {what} model directory {p} has no config.json")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.small_path, self.large_path = os.path.abspath(small), os.path.abspath(large)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.separate_tokenization = separate_tokenization
        self.prompts, self.video_prompts = list(prompts), list(video_prompts)
        if token_budget < max_length:
            raise ValueError(f"token_budget {token_budget} must hold at least one sample of max_length {max_length}")
        self.token_budget = token_budget
        self.small = _Side(self.small_path, device, max_length, token_budget)
        self.large = _Side(self.large_path, device, max_length, token_budget)
        if self.small.multimodal != self.large.multimodal:
            raise ValueError("DeltaLoss needs two multimodal models (NVILA or image-text-to-text) or two text-only "
                             "causal LMs, not one of each")
        if self.small.nvila != self.large.nvila and not separate_tokenization:
            raise ValueError("an NVILA model and an image-text-to-text model build different conversations; set "
                             "separate_tokenization: true")
        self._ready = False

    # ---- identity
    def config(self) -> dict[str, Any]:
        cfg = {"max_length": self.max_length, "separate_tokenization": self.separate_tokenization,
               "prompts": self.prompts, "video_prompts": self.video_prompts}
        if self.mode == "reference":  # only then, so capability-mode score files keep their hash
            cfg["mode"] = "reference"
        if self.small.vlm is not None or self.large.vlm is not None:  # likewise
            cfg["token_budget"] = self.token_budget
        if self.precision != "fp32":  # reduced precision moves the losses a little: its own config hash
            cfg["precision"] = self.precision
        return cfg

    def model_id(self) -> str:
        if self.mode == "reference":
            return f"pool={self.small_path};reference={self.large_path}"
        return f"small={self.small_path};large={self.large_path}"

    def weights_checksum(self) -> str:
        import hashlib

        return hashlib.sha256((dir_sha256(self.small_path) + dir_sha256(self.large_path)).encode()).hexdigest()

    def schema(self) -> pa.Schema:
        return pa.schema([
            ("loss_small", pa.float32()),
            ("loss_large", pa.float32()),
            ("delta_loss", pa.float32()),  # loss_small - loss_large: higher is more useful
            ("answer_tokens", pa.int32()),
            ("answer_tokens_large", pa.int32()),
        ])

    # ---- models
    def setup(self) -> None:
        if self._ready:
            return
        self.small.load()
        self.large.load()
        ns, nl = self.small.num_params(), self.large.num_params()
        if ns > nl and self.mode == "capability":
            log.warning("DeltaLoss: the 'small' model (%d parameters) is larger than the 'large' one (%d)", ns, nl)
        if not self.separate_tokenization and self.small.tokenizer.get_vocab() != self.large.tokenizer.get_vocab():
            raise ValueError("the small and large models use different tokenizers; set separate_tokenization: true "
                             "to let each model tokenize the samples itself")
        self._ready = True

    def _build(self, side: _Side, samples: Sequence[Any], errors: list[str | None]) -> list[Any]:
        """One example per sample (None where it cannot be built; the reason goes to errors)."""
        out: list[Any] = []
        if side.vlm is not None:
            for i, s in enumerate(samples):
                item = None
                if errors[i] is None:
                    try:
                        pick = zlib.crc32(s.key.encode())
                        item = side.vlm.build(s, self.prompts[pick % len(self.prompts)],
                                              self.video_prompts[pick % len(self.video_prompts)])
                    except ValueError as e:
                        errors[i] = f"deltaloss: {str(e)[:80]}"
                out.append(item)
            return out
        if side.nvila:
            from collections import Counter

            from model.examples import ExampleBuilder

            skipped: Counter = Counter()
            builder = ExampleBuilder(side.model, side.tokenizer, self.max_length, self.prompts, self.video_prompts, skipped)
            for i, s in enumerate(samples):
                if errors[i] is not None:
                    out.append(None)
                    continue
                before = dict(skipped)
                ex = builder(s)
                if ex is None:
                    reason = next((k for k in skipped if skipped[k] != before.get(k, 0)), "unusable sample")
                    errors[i] = f"deltaloss: {reason}"
                elif not any(lab != -100 for lab in ex.labels):
                    errors[i] = "deltaloss: sample has no answer tokens"
                    ex = None
                out.append(ex)
            return out
        for i, s in enumerate(samples):
            text = sample_text(s) if errors[i] is None else None
            if errors[i] is None and not (text and text.strip()):
                errors[i] = "deltaloss: sample has no text to score"
            out.append(text if errors[i] is None else None)
        return out

    def prepare(self, samples: Sequence[Any]) -> Prepared:
        self.setup()
        errors: list[str | None] = [s.error for s in samples]
        small = self._build(self.small, samples, errors)
        # NVILA media are preprocessed for each model's own vision config (tile size, image mode);
        # text-only items are raw text that each model's tokenizer encodes in _losses
        large = self._build(self.large, samples, errors) if self.small.multimodal else small
        for i in range(len(samples)):
            if errors[i] is not None:
                small[i] = large[i] = None
        return Prepared(list(samples), errors, (small, large))

    def _losses(self, side: _Side, items: list[Any]) -> list[tuple[float, int] | None]:
        """Mean answer-token loss and answer-token count per item (None stays None)."""
        import torch

        from model.conversation import collate

        if side.vlm is not None:
            with autocast(self.precision, self.device):
                return side.vlm.losses(items)
        idx = [i for i, x in enumerate(items) if x is not None]
        res: list[tuple[float, int] | None] = [None] * len(items)
        for j in range(0, len(idx), self.batch_size):
            chunk = idx[j: j + self.batch_size]
            with torch.inference_mode(), autocast(self.precision, self.device):
                if side.nvila:
                    b = collate([items[i] for i in chunk], side.tokenizer.pad_token_id)
                    embeds, mask, labels = side.model.build_inputs(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
                    logits = side.model.llm(inputs_embeds=embeds.to(self.device), attention_mask=mask.to(self.device)).logits
                else:
                    enc = side.tokenizer([items[i] for i in chunk], return_tensors="pt", padding=True, truncation=True,
                                         max_length=self.max_length)
                    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                    logits = side.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
                labels = labels.to(logits.device)
                # next-token loss per position, averaged over each sample's labelled tokens
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                       ignore_index=-100, reduction="none")
                valid = (labels[:, 1:] != -100)
                n = valid.sum(1)
                mean = (lp * valid).sum(1) / n.clamp_min(1)
            for k, i in enumerate(chunk):
                res[i] = (float(mean[k]), int(n[k])) if int(n[k]) > 0 else None
        return res

    def compute(self, prepared: Prepared) -> dict[str, list]:
        n = len(prepared.samples)
        cols = self.empty_columns(n)
        small_items, large_items = prepared.payload
        ls = self._losses(self.small, small_items)
        ll = self._losses(self.large, large_items)
        for i in range(n):
            if prepared.errors[i] is not None:
                continue
            if ls[i] is None or ll[i] is None:
                prepared.errors[i] = "deltaloss: sample has no answer tokens"
                continue
            cols["loss_small"][i], cols["answer_tokens"][i] = ls[i]
            cols["loss_large"][i], cols["answer_tokens_large"][i] = ll[i]
            cols["delta_loss"][i] = ls[i][0] - ll[i][0]
        return cols
