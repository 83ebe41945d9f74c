"""NVILA: SigLIP vision tower + spatial-to-channel MLP projector + Qwen2 LLM.

Media tokens (``<image>``, ``<vila/video>``) in the prompt are replaced, in order, by the
media's embeddings: an image becomes its projected (Dynamic-S2 merged) feature map; a video
becomes its frames' projected maps averaged in groups of ``video_pool_size`` along time, each
pooled frame followed by the ``<vila/sep>`` embedding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from model.config import IMAGE_TOKEN, MEDIA_TOKENS, SEP_TOKEN, VIDEO_TOKEN, NVILAConfig
from model.image_processing import ImageLayout, image_to_tiles, load_image, video_frames
from model.projector import build_projector
from model.vision import VisionTower, merge_s2, split_tiles, stitch

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class Media:
    """One preprocessed image or video: tiles for the vision tower and how to reassemble them."""

    kind: str  # "image" | "video"
    tiles: torch.Tensor  # (n_tiles, 3, T, T); a video has one tile per frame
    layout: ImageLayout | None = None

    def to(self, device: torch.device | str) -> "Media":
        return Media(self.kind, self.tiles.to(device, non_blocking=True), self.layout)


class NVILAForCausalLM(nn.Module):
    def __init__(self, config: NVILAConfig, vision_model: nn.Module | None = None, llm: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

        config.validate()
        self.config = config
        if vision_model is None:
            vision_model = SiglipVisionModel(SiglipVisionConfig(**_clean(config.vision())))
        if llm is None:
            llm = Qwen2ForCausalLM(Qwen2Config(**_clean(config.llm())))
        self.vision_tower = VisionTower(vision_model, config.vision_feature_layer)
        c_in = vision_model.config.hidden_size * config.num_scales
        self.projector = build_projector(config.projector_type, c_in, llm.config.hidden_size)
        self.llm = llm

    # ------------------------------------------------------------------ tokenizer
    def attach_tokenizer(self, tokenizer: Any) -> Any:
        """Add the media tokens to ``tokenizer`` if missing, grow the embeddings, record the ids."""
        missing = [t for t in MEDIA_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": list(missing)})
        old = self.llm.get_input_embeddings().num_embeddings
        if len(tokenizer) > old:
            # new rows start at the mean embedding: the same on every load (a released model
            # without <vila/sep> gets the same separator in the trainer, eval and DeltaLoss)
            self.llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                for emb in (self.llm.get_input_embeddings(), self.llm.get_output_embeddings()):
                    if emb is not None and emb.weight.shape[0] == len(tokenizer):
                        emb.weight[old:] = emb.weight[:old].mean(0)
        ids = tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS))
        self.config.image_token_id, self.config.video_token_id, self.config.sep_token_id = ids
        return tokenizer

    # ------------------------------------------------------------------ media
    def preprocess_image(self, data: Any) -> Media:
        img = load_image(data)
        c = self.config
        tiles, layout = image_to_tiles(img, c.image_mode, c.tile_size, c.s2_scales, c.max_tiles)
        return Media("image", tiles, layout)

    def preprocess_video(self, data: Any) -> Media:
        from model.image_processing import to_tensor

        c = self.config
        frames = video_frames(data, c.video_num_frames)
        return Media("video", torch.stack([to_tensor(f, (c.tile_size, c.tile_size)) for f in frames]))

    def encode_media(self, media: Sequence[Media]) -> list[torch.Tensor]:
        """Embeddings (n_tokens, D) for each media item; all tiles go through the tower at once."""
        if not media:
            return []
        feats = self.vision_tower(torch.cat([m.tiles for m in media]))
        out, i = [], 0
        k = self.config.num_scales
        for m in media:
            f = feats[i: i + len(m.tiles)]
            i += len(m.tiles)
            if m.kind == "image":
                out.append(self._image_tokens(f, m.layout))
            else:
                out.append(self._video_tokens(f, k))
        return out

    def _project(self, maps: torch.Tensor) -> torch.Tensor:
        x = self.projector(maps.to(self._proj_dtype()))
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _proj_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def _image_tokens(self, feats: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        mode = self.config.image_mode
        if mode == "dynamic_s2":
            # VILA projects each last-scale tile of the merged map on its own, then stitches the
            # projected tiles back: (rows*cols) x (g x g) tokens in row-major order of the image
            rows, cols = layout.grids[-1]
            tiles = split_tiles(merge_s2(feats, layout), rows, cols)
            projected = self.projector(tiles.to(self._proj_dtype()))  # (rows*cols, g, g, D)
            merged = stitch(projected, rows, cols)
            return merged.reshape(-1, merged.shape[-1])
        # resize / dynamic: every tile (and the thumbnail) projected on its own
        return self._project(feats).reshape(-1, self.llm.config.hidden_size)

    def _video_tokens(self, feats: torch.Tensor, k: int) -> torch.Tensor:
        # frames are encoded at the tile scale; with Dynamic-S2 the projector expects k scales
        # of channels: a single-scale map is what S2's merge gives when every scale is the tile
        if k > 1:
            feats = feats.repeat(1, 1, 1, k)
        tokens = self._project(feats)  # (F, t, D)
        pool = self.config.video_pool_size
        f = tokens.shape[0]
        if f % pool:
            tokens = torch.cat([tokens, tokens[-1:].expand(pool - f % pool, -1, -1)])  # repeat the last frame
        pooled = tokens.view(-1, pool, tokens.shape[1], tokens.shape[2]).mean(1)  # (F/pool, t, D)
        sep = self.llm.get_input_embeddings().weight[self.config.sep_token_id].to(pooled.dtype)
        sep = sep.view(1, 1, -1).expand(pooled.shape[0], 1, -1)
        return torch.cat([pooled, sep], dim=1).reshape(-1, pooled.shape[-1])

    # ------------------------------------------------------------------ splicing
    def build_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        media: Sequence[Sequence[Media]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace each media token by its embeddings; returns (inputs_embeds, attention_mask, labels)
        right-padded to the longest spliced sequence."""
        c = self.config
        if c.image_token_id is None:
            raise RuntimeError("no tokenizer attached: call model.attach_tokenizer(tokenizer) first")
        media = media or [[] for _ in range(input_ids.shape[0])]
        if len(media) != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} sequences but media for {len(media)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        flat = [m for ms in media for m in ms]
        embeds = iter(self.encode_media(flat))
        tok_embed = self.llm.get_input_embeddings()
        seqs, labs = [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()]
            lab = labels[b][attention_mask[b].bool()] if labels is not None else None
            is_media = (ids == c.image_token_id) | (ids == c.video_token_id)
            positions = is_media.nonzero().flatten().tolist()
            if len(positions) != len(media[b]):
                raise ValueError(f"sequence {b} has {len(positions)} media tokens but {len(media[b])} media were given")
            for pos, m in zip(positions, media[b]):
                want = c.image_token_id if m.kind == "image" else c.video_token_id
                if int(ids[pos]) != want:
                    tok = IMAGE_TOKEN if m.kind == "image" else VIDEO_TOKEN
                    raise ValueError(f"sequence {b}: media {m.kind} is at a position whose token is not {tok}")
            text = tok_embed(ids)
            parts, lparts, start = [], [], 0
            for pos in positions:
                e = next(embeds).to(text.dtype)
                parts += [text[start:pos], e]
                if lab is not None:
                    lparts += [lab[start:pos], torch.full((e.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)]
                start = pos + 1
            parts.append(text[start:])
            seqs.append(torch.cat(parts))
            if lab is not None:
                lparts.append(lab[start:])
                labs.append(torch.cat(lparts))
        n = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[-1]
        out = seqs[0].new_zeros(len(seqs), n, d)
        mask = torch.zeros(len(seqs), n, dtype=torch.long, device=out.device)
        lab_out = torch.full((len(seqs), n), IGNORE_INDEX, dtype=torch.long, device=out.device) if labels is not None else None
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
            if lab_out is not None:
                lab_out[i, : s.shape[0]] = labs[i]
        return out, mask, lab_out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, media: Sequence[Sequence[Media]] | None = None, **kw: Any):
        embeds, mask, labs = self.build_inputs(input_ids, attention_mask, labels, media)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labs, **kw)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 media: Sequence[Sequence[Media]] | None = None, **gen_kwargs: Any) -> torch.Tensor:
        """New tokens only (batch, new_len); greedy unless sampling is asked for."""
        embeds, mask, _ = self.build_inputs(input_ids, attention_mask, None, media)
        if embeds.shape[0] > 1:
            # generation continues each row from its end: left-align by padding on the left
            lens = mask.sum(1)
            n = embeds.shape[1]
            left = embeds.new_zeros(embeds.shape)
            lmask = torch.zeros_like(mask)
            for i, ln in enumerate(lens.tolist()):
                left[i, n - ln:] = embeds[i, :ln]
                lmask[i, n - ln:] = 1
            embeds, mask = left, lmask
        gen_kwargs.setdefault("do_sample", False)
        gen_kwargs.setdefault("max_new_tokens", 32)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)

    # ------------------------------------------------------------------ parameters
    def module_groups(self) -> dict[str, nn.Module]:
        """The parts a training stage can train: vision_tower, projector, llm."""
        return {"vision_tower": self.vision_tower, "projector": self.projector, "llm": self.llm}

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str, tokenizer: Any | None = None, layout: str = "nvila") -> str:
        """``layout="nvila"``: one config and one weights file; ``"vila"``: VILA's three folders
        (``model.vila_layout``), which VILA's own loader and SGLang read."""
        from safetensors.torch import save_model

        if layout == "vila":
            from model.vila_io import save_vila

            return save_vila(self, path, tokenizer)
        if layout != "nvila":
            raise ValueError(f"unknown layout {layout!r}; expected 'nvila' or 'vila'")
        os.makedirs(path, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["vision_config"] = self.vision_tower.model.config.to_dict()
        cfg["llm_config"] = self.llm.config.to_dict()
        cfg["vision_path"] = cfg["llm_path"] = None
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(_jsonable(cfg), f, indent=2, sort_keys=True)
        save_model(self, os.path.join(path, WEIGHTS_NAME))  # handles tied embeddings
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None) -> "NVILAForCausalLM":
        """Load a directory written by ``save_pretrained``, in our layout or VILA's."""
        from safetensors.torch import load_model

        from model.vila_layout import is_vila_dir

        if is_vila_dir(path):
            from model.vila_io import load_vila

            return load_vila(cls, path, dtype)
        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} is not an NVILA checkpoint (no {CONFIG_NAME})")
        config = NVILAConfig.load(cfg_path)
        model = cls(config)
        if config.image_token_id is not None:
            vocab = max(config.image_token_id, config.video_token_id, config.sep_token_id) + 1
            if model.llm.get_input_embeddings().num_embeddings < vocab:
                model.llm.resize_token_embeddings(vocab)
        load_model(model, os.path.join(path, WEIGHTS_NAME))
        if dtype is not None:
            model.to(dtype)
        return model

    @classmethod
    def from_components(cls, vision_path: str, llm_path: str, **config_kwargs: Any) -> tuple["NVILAForCausalLM", Any]:
        """Build from a SigLIP directory and a Qwen2 directory (with its tokenizer); the projector
        starts fresh. Returns (model, tokenizer)."""
        from transformers import AutoTokenizer, Qwen2ForCausalLM, SiglipVisionModel

        for what, p in (("SigLIP", vision_path), ("Qwen2", llm_path)):
            if not os.path.isfile(os.path.join(p, CONFIG_NAME)):
                raise FileNotFoundError(f"{what} directory {p} has no {CONFIG_NAME}")
        vision = SiglipVisionModel.from_pretrained(vision_path)
        llm = Qwen2ForCausalLM.from_pretrained(llm_path)
        config = NVILAConfig(vision_config=vision.config.to_dict(), llm_config=llm.config.to_dict(), **config_kwargs)
        model = cls(config, vision, llm)
        tokenizer = AutoTokenizer.from_pretrained(llm_path)
        model.attach_tokenizer(tokenizer)
        return model, tokenizer


def load_tokenizer(path: str) -> Any:
    """The tokenizer of an NVILA directory (VILA's layout keeps it in ``llm/``)."""
    from model.vila_layout import is_vila_dir

    if is_vila_dir(path):
        from model.vila_io import vila_tokenizer

        return vila_tokenizer(path)
    return load_tokenizer_dir(path)


def load_tokenizer_dir(path: str) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer peeks at config.json, whose model_type (nvila) transformers does not know;
    # the tokenizer's own files say what it is, so that notice is noise here
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(level)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """Drop keys that describe a saved config rather than configure one."""
    return {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "model_type", "_name_or_path")}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return x


__all__ = ["NVILAForCausalLM", "Media", "IGNORE_INDEX", "SEP_TOKEN"]
