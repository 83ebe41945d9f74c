"""CLIP filter scores (DataComp / DFN) with OpenCLIP.

Cosine similarity of L2-normalized image and text embeddings, raw in [-1, 1] (DataComp's
convention: e.g. "B/32 score >= 0.28"; not multiplied by 100 as in CLIP's logits).

- pair: one score, image vs caption.
- interleaved (MMC4): the image x sentence similarity matrix; each image's best sentence
  (MMC4's assignment) and score; document summaries: mean and min of the matched scores,
  and how many images fall below ``threshold``. Also a one-to-one assignment (greedy on the
  matrix, highest similarity first, each sentence to at most one image): a distractor image
  (an ad, a logo) often has a "best" sentence that really describes another image; under
  one-to-one assignment it loses that sentence to the image it describes and is left with a
  filler or nothing, so ``clip_assigned_min`` (the worst image's one-to-one score; -1 for an
  image left without a sentence) is what a per-image distractor rule thresholds.
- video: ``num_frames`` frames sampled evenly over the clip, each scored against the
  caption; mean and min over frames.

Models: any ``open_clip`` model name with a ``pretrained`` tag or local weights file, a
``local-dir:/path`` or ``hf-hub:org/repo`` id, or a plain local directory holding
``open_clip_config.json`` + ``open_clip_model.safetensors`` (what ``curate train-filter`` saves).
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from scorers import clip_heads
from scorers.base import Prepared, Scorer, decoded_frames, decoded_image, dir_sha256, file_sha256
from scorers.clip_pixels import DECODES, PRECISIONS, autocast, effective_precision, is_jpeg

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "clip_configs")


def register_configs() -> None:
    """Make the small configs shipped here (``tiny-clip``, ...) known to open_clip by name."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def normalize_model_name(model: str) -> str:
    if not model.startswith(("local-dir:", "hf-hub:")) and os.path.isdir(model):
        return f"local-dir:{os.path.abspath(model)}"
    if model.startswith("local-dir:"):
        return f"local-dir:{os.path.abspath(model[len('local-dir:'):])}"
    return model


def sample_frames(sample: Any, k: int) -> list[Any]:
    """``k`` PIL frames spread evenly over a clip (fewer if it is shorter), from the frames the
    reader kept (one decode per pass) or decoded here."""
    frames = decoded_frames(sample)
    if len(frames) <= k:
        return frames
    idx = np.linspace(0, len(frames) - 1, k).round().astype(int)
    return [frames[i] for i in idx]


def one_to_one_scores(sim: np.ndarray) -> np.ndarray:
    """Per image (row), its similarity under a greedy one-to-one image -> sentence assignment
    (pairs taken highest first; an image left without a free sentence gets -1)."""
    n_img, n_txt = sim.shape
    out = np.full(n_img, -1.0)
    img_free, txt_free = np.ones(n_img, bool), np.ones(n_txt, bool)
    for flat in np.argsort(-sim, axis=None, kind="stable"):
        i, j = divmod(int(flat), n_txt)
        if img_free[i] and txt_free[j]:
            out[i] = sim[i, j]
            img_free[i] = txt_free[j] = False
    return out


class ClipScorer(Scorer):
    name = "clip"
    version = "2"  # 2: one-to-one assignment for documents
    prepare_threadsafe = True  # the tokenizer is used under a lock

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        num_frames: int = 4,
        threshold: float = 0.2,
        keep_embedding: bool = False,
        torch_threads: int | None = None,
        seed: int = 0,
        precision: str = "auto",
        decode: str = "cpu",
        heads: list[dict[str, Any]] | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("num_frames", num_frames)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not -1 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [-1, 1] (a cosine similarity), got {threshold!r}")
        self.model_name = normalize_model_name(model)
        self.pretrained = pretrained
        self.device = device
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.threshold = threshold
        self.keep_embedding = keep_embedding
        self.torch_threads = torch_threads
        self.seed = seed
        self.precision = effective_precision(precision, device)
        self.decode = decode
        import threading

        self._tok_lock = threading.Lock()
        self.model = None
        self.preprocess = None
        self.tokenizer = None
        self._check_paths()
        self.heads = clip_heads.load_heads(heads)  # columns from the image embeddings (clip_heads.py)
        if self.heads:
            clip_heads.check_dims(self.heads, clip_heads.embed_dim_of(self.model_name), self.model_name)

    def _check_paths(self) -> None:
        """Fail at construction (before any work) on a model that cannot load."""
        if not self.model_name.startswith(("local-dir:", "hf-hub:")):
            if os.sep in self.model_name or self.model_name.startswith((".", "~")):
                raise FileNotFoundError(f"CLIP model directory not found: {self.model_name}")
            import open_clip

            register_configs()
            if open_clip.get_model_config(self.model_name) is None:
                raise ValueError(f"unknown open_clip model {self.model_name!r} (not a built-in config, "
                                 f"a local directory, a local-dir: or an hf-hub: id)")
        if self.model_name.startswith("local-dir:"):
            path = self.model_name[len("local-dir:"):]
            if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
                raise FileNotFoundError(f"CLIP model directory {path} has no open_clip_config.json")
        if self.pretrained:
            looks_like_file = os.sep in self.pretrained or self.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
            if looks_like_file:
                if not os.path.isfile(self.pretrained):
                    raise FileNotFoundError(f"CLIP weights file not found: {self.pretrained}")
            elif not self.model_name.startswith(("local-dir:", "hf-hub:")):
                import open_clip

                tags = open_clip.list_pretrained_tags_by_model(self.model_name)
                if self.pretrained not in tags:
                    raise ValueError(f"unknown pretrained tag {self.pretrained!r} for {self.model_name} "
                                     f"(known: {', '.join(tags) or 'none'}; or give a weights file path)")

    # ---- identity
    def config(self) -> dict[str, Any]:
        cfg = {"num_frames": self.num_frames, "threshold": self.threshold, "keep_embedding": self.keep_embedding}
        if self.pretrained is None and not self.model_name.startswith(("local-dir:", "hf-hub:")):
            cfg["random_init_seed"] = self.seed
        if self.precision != "fp32":  # reduced precision moves scores a little: its own config hash
            cfg["precision"] = self.precision
        if self.decode != "cpu":  # so does the device's JPEG decoder and tensor resize
            cfg["decode"] = self.decode
        if self.heads:  # their weights' checksums too: new head weights, new scores
            cfg["heads"] = [h.identity() for h in self.heads]
        return cfg

    def model_id(self) -> str:
        if self.model_name.startswith(("local-dir:", "hf-hub:")):
            return self.model_name
        return f"{self.model_name}:{self.pretrained or 'random-init'}"

    def weights_checksum(self) -> str | None:
        if self.model_name.startswith("local-dir:"):
            return dir_sha256(self.model_name[len("local-dir:"):])
        if self.pretrained and os.path.isfile(self.pretrained):
            return file_sha256(self.pretrained)
        return None

    def schema(self) -> pa.Schema:
        fields = [
            ("clip_score", pa.float32()),  # pair: cosine; document: mean matched; video: mean over frames
            ("clip_min", pa.float32()),
            ("clip_num_images", pa.int32()),  # images (document) or frames (video) scored
            ("clip_images_below", pa.int32()),  # matched scores below the threshold
            ("clip_best_sentence", pa.list_(pa.int32())),
            ("clip_best_score", pa.list_(pa.float32())),
            ("clip_sim_matrix", pa.list_(pa.list_(pa.float32()))),
            ("clip_assigned_score", pa.list_(pa.float32())),  # document: per image, one-to-one (module docstring)
            ("clip_assigned_min", pa.float32()),
            ("clip_frame_scores", pa.list_(pa.float32())),
        ]
        if self.keep_embedding:
            fields.append(("clip_image_emb", pa.list_(pa.float32())))
        fields += [(h.name, pa.float32()) for h in self.heads]
        return pa.schema(fields)

    # ---- model
    def setup(self) -> None:
        import open_clip
        import torch

        register_configs()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        torch.manual_seed(self.seed)  # only matters for random-init models (benchmarks)
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=self.pretrained, device=self.device
        )
        model.eval()
        self.model, self.preprocess = model, preprocess
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        if self.heads:
            clip_heads.check_dims(self.heads, getattr(model.visual, "output_dim", None), self.model_name)
            self.heads = [h.to(self.device) for h in self.heads]

    def _ensure(self) -> None:
        if self.model is None:
            self.setup()

    # ---- scoring
    def _images(self, s: Any) -> tuple[list[Any], list[str]]:
        """A sample's images (PIL images, or JPEG bytes the device decodes) and texts."""
        on_device = self.decode == "gpu"

        def image(name: str | None) -> Any:
            kept = getattr(s, "pixels", None) if name is None else (getattr(s, "pixels", None) or {}).get(name)
            data = s.image if name is None else s.images[name]
            if on_device and kept is None and is_jpeg(data):
                return data  # decoded in compute, batched, on the device
            return decoded_image(s, name)

        if s.kind == "pair":
            return [image(None)], [s.caption or ""]
        if s.kind == "interleaved":
            ims = [image(e["image_name"]) for e in s.image_info]
            if not ims or not s.text_list:
                raise ValueError("document has no images" if not ims else "document has no sentences")
            return ims, list(s.text_list)
        if s.kind == "video":
            return sample_frames(s, self.num_frames), [s.caption or ""]
        raise ValueError(f"unsupported sample kind {s.kind!r}")

    def prepare(self, samples: Sequence[Any]) -> Prepared:
        """Decode (or reuse the reader's pixels) and transform images, sample frames, tokenize
        text (no model involved; runs on the engine's decode threads)."""
        self._ensure()
        errors: list[str | None] = [s.error for s in samples]
        images: list[Any] = []  # preprocessed CHW tensors, or JPEG bytes for the device decoder
        texts: list[str] = []
        spans: list[tuple[int, int, int, int] | None] = []
        for i, s in enumerate(samples):
            if errors[i] is not None:
                spans.append(None)
                continue
            try:
                ims, txt = self._images(s)
                tensors = [im if isinstance(im, bytes) else self.preprocess(im.convert("RGB")) for im in ims]
            except Exception as e:  # noqa: BLE001 - one bad sample is that sample's error
                errors[i] = f"clip: cannot prepare sample: {e}"
                spans.append(None)
                continue
            spans.append((len(images), len(tensors), len(texts), len(txt)))
            images.extend(tensors)
            texts.extend(txt)
        payload = None
        if images:
            with self._tok_lock:
                tokens = self.tokenizer(texts)
            payload = (self._stack(images), tokens)
        return Prepared(list(samples), errors, payload, {"spans": spans})

    def _stack(self, images: list[Any]) -> Any:
        """One pinned batch tensor when every image is ready (pinned memory lets the copy to the
        GPU run without blocking); the list as it is when the device still has JPEGs to decode."""
        import torch

        if any(isinstance(x, bytes) for x in images):
            return images
        batch = torch.stack(images)
        return batch.pin_memory() if str(self.device).startswith("cuda") else batch

    def _pixels(self, prepared: Prepared) -> Any:
        """The batch on the device: JPEGs decoded there in one call, the rest copied over."""
        import torch

        from scorers.clip_pixels import decode_batch, pil_from_bytes, tensor_preprocess

        images = prepared.payload[0]
        if not isinstance(images, list):
            return images.to(self.device, non_blocking=True)
        jpeg_at = [k for k, x in enumerate(images) if isinstance(x, bytes)]
        decoded = decode_batch([images[k] for k in jpeg_at], self.device)
        out = list(images)
        for k, img in zip(jpeg_at, decoded):
            if img is not None:
                out[k] = tensor_preprocess(self.preprocess, img)
                continue
            try:  # the device's decoder refused it: Pillow on the CPU
                out[k] = self.preprocess(pil_from_bytes(images[k]).convert("RGB"))
            except Exception as e:  # noqa: BLE001 - undecodable: that sample's error
                out[k] = None
                self._fail_image(prepared, k, f"clip: cannot decode image: {e}")
        like = next((x for x in out if x is not None), None)
        out = [x if x is not None else torch.zeros_like(like) for x in out]
        return torch.stack([x.to(self.device, non_blocking=True) for x in out])

    @staticmethod
    def _fail_image(prepared: Prepared, k: int, reason: str) -> None:
        spans = prepared.extra["spans"]
        for i, span in enumerate(spans):
            if span is not None and span[0] <= k < span[0] + span[1]:
                prepared.errors[i], spans[i] = reason, None

    def compute(self, prepared: Prepared) -> dict[str, list]:
        import torch

        self._ensure()
        n = len(prepared.samples)
        cols = self.empty_columns(n)
        if prepared.payload is None:
            return cols
        tokens = prepared.payload[1]
        with torch.inference_mode(), autocast(self.precision, self.device):
            pixel = self._pixels(prepared)
            img = torch.cat([self.model.encode_image(pixel[j: j + self.batch_size])
                             for j in range(0, len(pixel), self.batch_size)])
            txt = torch.cat([self.model.encode_text(tokens[j: j + self.batch_size].to(self.device, non_blocking=True))
                             for j in range(0, len(tokens), self.batch_size)])
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        img_np, txt_np = img.cpu().numpy(), txt.cpu().numpy()
        clip_heads.fill_columns(self.heads, img, prepared.extra["spans"], cols)  # same embeddings, same pass
        for i, (s, span) in enumerate(zip(prepared.samples, prepared.extra["spans"])):
            if span is None:
                continue
            i0, ni, t0, nt = span
            sim = img_np[i0: i0 + ni] @ txt_np[t0: t0 + nt].T  # images x texts
            if s.kind == "pair":
                score = float(sim[0, 0])
                cols["clip_score"][i] = cols["clip_min"][i] = score
                cols["clip_num_images"][i] = 1
                cols["clip_images_below"][i] = int(score < self.threshold)
            elif s.kind == "interleaved":
                best = sim.argmax(axis=1)
                best_score = sim.max(axis=1)
                cols["clip_score"][i] = float(best_score.mean())
                cols["clip_min"][i] = float(best_score.min())
                cols["clip_num_images"][i] = int(ni)
                cols["clip_images_below"][i] = int((best_score < self.threshold).sum())
                cols["clip_best_sentence"][i] = best.astype(int).tolist()
                cols["clip_best_score"][i] = best_score.astype(float).tolist()
                cols["clip_sim_matrix"][i] = sim.astype(float).tolist()
                assigned = one_to_one_scores(sim)
                cols["clip_assigned_score"][i] = assigned.astype(float).tolist()
                cols["clip_assigned_min"][i] = float(assigned.min())
            else:  # video: every frame against the caption
                frames = sim[:, 0]
                cols["clip_score"][i] = float(frames.mean())
                cols["clip_min"][i] = float(frames.min())
                cols["clip_num_images"][i] = int(ni)
                cols["clip_images_below"][i] = int((frames < self.threshold).sum())
                cols["clip_frame_scores"][i] = frames.astype(float).tolist()
            if self.keep_embedding:
                cols["clip_image_emb"][i] = img_np[i0: i0 + ni].mean(axis=0).astype(float).tolist()
        return cols


def save_open_clip_dir(model: Any, model_cfg: dict[str, Any], out_dir: str, preprocess_cfg: dict[str, Any] | None = None) -> str:
    """Save an OpenCLIP model as a directory loadable with ``local-dir:`` (and the Hub layout)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "open_clip_model.safetensors"))
    return out_dir
