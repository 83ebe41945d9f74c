"""Heads over CLIP image embeddings: aesthetic, NSFW, watermark, ... in the ``clip`` scorer's own pass.

A head is a small network the user brings as a weights file; it reads the L2-normalized image
embedding the ``clip`` scorer already computes for ``clip_score`` and adds one float column, so a
head costs no second image-model run and no second decode. In a recipe::

    - name: clip
      params:
        model: ViT-L-14
        pretrained: /models/ViT-L-14.pt
        heads:
          - {name: aesthetic, path: /models/sac+logos+ava1-l14-linearMSE.pth, format: laion_aesthetic}
          - {name: nsfw, path: /models/nsfw_probe.safetensors, format: linear, output: sigmoid, reduce: max}

Formats (the on-disk layouts of published heads, read with ``safetensors`` or
``torch.load(weights_only=True)``, never by unpickling code):

- ``laion_aesthetic``: the LAION improved aesthetic predictor's state dict (``layers.{0,2,4,6,7}``:
  five ``nn.Linear`` layers D -> 1024 -> 128 -> 64 -> 16 -> 1 in an ``nn.Sequential`` whose other
  entries are dropouts, no activations; the ``*-linearMSE.pth`` files), on ViT-L/14 embeddings.
- ``laion_nsfw_h14``: clip-retrieval's H/14 NSFW MLP (``layers.{0,3,6,9,12,15,16}``: D -> 1024 ->
  2048 -> 1024 -> 256 -> 128 -> 16 -> 1, a ReLU after each of the first five), on ViT-H/14 embeddings.
- ``mlp``: any ``nn.Sequential`` of linear layers (``<prefix>.<i>.weight`` / ``.bias``, taken in
  index order), with ``activation`` (``none``, ``relu``, ``gelu``) after every hidden layer or
  ``activations``, one per hidden layer; optional ``input_mean`` / ``input_std`` tensors
  standardize the embedding first (a Keras ``Normalization`` layer, exported).
- ``linear``: a linear probe: one weight matrix (``weight`` or ``<prefix>.weight``, K x D or D) and
  its optional bias.

``output``: ``identity`` (the raw value: LAION's 1-10 aesthetic scale), ``sigmoid``, or ``softmax``
with ``index`` (the probability of one class of a K-way head). ``reduce`` says how a document's
images or a clip's frames become one value: ``mean`` (default), ``max`` or ``min``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from scorers.base import file_sha256

FORMATS = ("laion_aesthetic", "laion_nsfw_h14", "mlp", "linear")
OUTPUTS = ("identity", "sigmoid", "softmax")
REDUCES = ("mean", "max", "min")
ACTIVATIONS = ("none", "relu", "gelu")
# layer indices in the published nn.Sequential layouts, and the activation after each hidden layer
LAYOUTS = {
    "laion_aesthetic": ([0, 2, 4, 6, 7], ["none"] * 4),
    "laion_nsfw_h14": ([0, 3, 6, 9, 12, 15, 16], ["relu"] * 5 + ["none"]),
}
KEYS = {"name", "path", "format", "output", "index", "reduce", "activation", "activations"}
IDENTITY = ("dataset", "shard", "key", "kind", "error")
NOT_LOADABLE = {  # suffix -> why, and what to do instead
    (".h5", ".keras", ".pb", ".zip"): "a Keras / TensorFlow model (e.g. LAION's autokeras CLIP NSFW detector); "
    "export its Dense kernels (transposed) and biases, and its Normalization layer's mean and "
    "sqrt(variance) as input_mean / input_std, to a safetensors file in the 'mlp' layout",
    (".onnx",): "an ONNX graph; export its weights to a safetensors state dict in the 'mlp' or 'linear' layout",
}


class HeadError(ValueError):
    """A head that cannot be used: its message names the head."""


@dataclass
class Head:
    """One loaded head: its config, its linear layers (weight K x D, bias) and what follows them."""

    name: str
    path: str
    format: str
    output: str = "identity"
    index: int | None = None
    reduce: str = "mean"
    activations: list[str] = field(default_factory=list)
    layers: list[tuple[Any, Any]] = field(default_factory=list)  # torch tensors
    input_mean: Any = None
    input_std: Any = None

    @property
    def in_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.format, "output": self.output, "index": self.index,
                "reduce": self.reduce, "activations": self.activations, "sha256": file_sha256(self.path)}

    def to(self, device: str) -> "Head":
        self.layers = [(w.to(device), None if b is None else b.to(device)) for w, b in self.layers]
        if self.input_mean is not None:
            self.input_mean, self.input_std = self.input_mean.to(device), self.input_std.to(device)
        return self

    def __call__(self, emb: Any) -> Any:
        """One value per row of ``emb`` (N x D, float32)."""
        import torch

        x = emb if self.input_mean is None else (emb - self.input_mean) / self.input_std
        for j, (w, b) in enumerate(self.layers):
            x = torch.nn.functional.linear(x, w, b)
            act = self.activations[j] if j < len(self.activations) else "none"
            x = torch.relu(x) if act == "relu" else torch.nn.functional.gelu(x) if act == "gelu" else x
        if self.output == "softmax":
            return torch.softmax(x, dim=-1)[:, self.index]
        x = x[:, 0]
        return torch.sigmoid(x) if self.output == "sigmoid" else x


def read_state(path: str, name: str) -> dict[str, Any]:
    """A weights file as a flat name -> tensor dict, loaded without running any pickled code."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"clip head {name!r}: weights file not found: {path}")
    for suffixes, why in NOT_LOADABLE.items():
        if path.lower().endswith(suffixes):
            raise HeadError(f"clip head {name!r}: {path} is {why}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a pickle with code in it, or not a torch file at all
            raise HeadError(f"clip head {name!r}: cannot read {path} as a state dict (safetensors, or a .pt/.pth "
                            f"that torch.load(weights_only=True) accepts): {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's usual wrapper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadError(f"clip head {name!r}: {path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v.float() for k, v in state.items()}


def _sequential(state: dict[str, Any], name: str, path: str) -> list[tuple[int, Any, Any]]:
    """(index, weight, bias) of every 2-D ``<prefix>.<i>.weight`` in index order."""
    found = []
    for k, w in state.items():
        m = re.fullmatch(r"(?:.*\.)?(\d+)\.weight", k)
        if m and w.dim() != 2:  # a norm or conv layer: not a chain of linear layers, refuse it rather than skip it
            raise HeadError(f"clip head {name!r}: {path} has {k} of shape {tuple(w.shape)}; heads are linear layers only")
        if m:
            found.append((int(m[1]), w, state.get(k[: -len("weight")] + "bias")))
    if not found:
        raise HeadError(f"clip head {name!r}: {path} has no '<i>.weight' linear layers (keys: {sorted(state)[:8]})")
    return sorted(found, key=lambda t: t[0])


def _layers(fmt: str, state: dict[str, Any], name: str, path: str, acts: list[str]) -> tuple[list, list[str]]:
    if fmt == "linear":
        ws = [(k, v) for k, v in state.items() if k.rsplit(".", 1)[-1] == "weight" and v.dim() in (1, 2)]
        if len(ws) != 1:
            raise HeadError(f"clip head {name!r}: a 'linear' head has one weight tensor; {path} has "
                            f"{[k for k, _ in ws] or 'none'}")
        key, w = ws[0]
        b = state.get(key[: -len("weight")] + "bias")
        return [(w.reshape(1, -1) if w.dim() == 1 else w, None if b is None else b.reshape(-1))], []
    seq = _sequential(state, name, path)
    if fmt in LAYOUTS:
        want, acts = LAYOUTS[fmt]
        got = [i for i, _, _ in seq]
        if got != want:
            raise HeadError(f"clip head {name!r}: {path} is not in the {fmt} layout: linear layers at "
                            f"{got}, expected {want}")
    layers = [(w, b) for _, w, b in seq]
    if fmt == "mlp" and len(acts) not in (1, len(layers) - 1) and len(layers) > 1:
        raise HeadError(f"clip head {name!r}: 'activations' needs one per hidden layer ({len(layers) - 1}), "
                        f"got {len(acts)}")
    if fmt == "mlp" and len(acts) == 1:
        acts = acts * (len(layers) - 1)
    return layers, acts


def _check_chain(head: Head) -> None:
    for j in range(1, len(head.layers)):
        prev, cur = head.layers[j - 1][0], head.layers[j][0]
        if cur.shape[1] != prev.shape[0]:
            raise HeadError(f"clip head {head.name!r}: layer {j} takes {cur.shape[1]} inputs but layer {j - 1} "
                            f"gives {prev.shape[0]}")
    k = int(head.layers[-1][0].shape[0])
    if head.output == "softmax":
        if head.index is None or not 0 <= head.index < k:
            raise HeadError(f"clip head {head.name!r}: output softmax needs index in [0, {k}), got {head.index!r}")
    elif k != 1:
        raise HeadError(f"clip head {head.name!r}: gives {k} outputs; use output: softmax with an index, "
                        f"or a head with one output")


def load_head(cfg: dict[str, Any]) -> Head:
    """A head from its recipe entry (validated), its weights read from ``path``."""
    if not isinstance(cfg, dict) or not {"name", "path", "format"} <= set(cfg) or not set(cfg) <= KEYS:
        raise HeadError(f"clip head {cfg!r}: needs name, path and format (optional: output, index, reduce, "
                        f"activation, activations)")
    name = str(cfg["name"])
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or name.startswith("clip_") or name in IDENTITY:
        raise HeadError(f"clip head {name!r}: its name is its column; use lower-case letters, digits and _, "
                        f"not starting with 'clip_' or an identity column")
    for key, allowed in (("format", FORMATS), ("output", OUTPUTS), ("reduce", REDUCES)):
        if key in cfg and cfg[key] not in allowed:
            raise HeadError(f"clip head {name!r}: {key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    acts = list(cfg.get("activations") or [cfg.get("activation", "none")])
    if any(a not in ACTIVATIONS for a in acts):
        raise HeadError(f"clip head {name!r}: activations must be among {', '.join(ACTIVATIONS)}, got {acts}")
    path = os.path.abspath(os.path.expanduser(str(cfg["path"])))
    state = read_state(path, name)
    layers, acts = _layers(cfg["format"], state, name, path, acts)
    head = Head(name, path, cfg["format"], cfg.get("output", "identity"), cfg.get("index"), cfg.get("reduce", "mean"),
                acts, layers, state.get("input_mean"), state.get("input_std"))
    _check_chain(head)
    return head


def load_heads(cfgs: Sequence[dict[str, Any]] | None) -> list[Head]:
    if cfgs is None:
        return []
    if not isinstance(cfgs, (list, tuple)):
        raise HeadError(f"clip heads must be a list of {{name, path, format}}, got {cfgs!r}")
    heads = [load_head(c) for c in cfgs]
    names = [h.name for h in heads]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise HeadError(f"clip heads: two heads named {dup} (each name is a column)")
    return heads


def embed_dim_of(model_name: str) -> int | None:
    """The image embedding width of an open_clip model, from its config; None when only loading tells."""
    if model_name.startswith("local-dir:"):
        cfg_path = os.path.join(model_name[len("local-dir:"):], "open_clip_config.json")
        with open(cfg_path) as f:
            return (json.load(f).get("model_cfg") or {}).get("embed_dim")
    if model_name.startswith("hf-hub:"):
        return None
    import open_clip

    return (open_clip.get_model_config(model_name) or {}).get("embed_dim")


def check_dims(heads: Sequence[Head], dim: int | None, model: str) -> None:
    for h in heads:
        if dim is not None and h.in_dim != dim:
            raise HeadError(f"clip head {h.name!r} ({h.path}) takes {h.in_dim}-d embeddings, but the clip model "
                            f"{model} gives {dim}-d ones: use the CLIP model the head was trained on")


def fill_columns(heads: Sequence[Head], img: Any, spans: Sequence[Any], cols: dict[str, list]) -> None:
    """Run every head on the batch's normalized image embeddings (N x D) and put one value per scored
    sample (its images or frames reduced) into ``cols``."""
    import torch

    if not heads:
        return
    with torch.inference_mode():
        values = {h.name: h(img).float().cpu().numpy() for h in heads}
    reducers = {"mean": np.mean, "max": np.max, "min": np.min}
    for h in heads:
        v, col, red = values[h.name], cols[h.name], reducers[h.reduce]
        for i, span in enumerate(spans):
            if span is not None:
                col[i] = float(red(v[span[0]: span[0] + span[1]]))
