"""Pixels for the CLIP scorer: autocast settings, and batched JPEG decoding on the model's device.

``decode="gpu"``: JPEG bytes are decoded in one batched ``torchvision.io.decode_jpeg`` call on
the scorer's device (nvJPEG on CUDA; the same call runs on the CPU, which is how it is tested
without a GPU), then resized, cropped and normalized there by open_clip's own transform (its
torchvision ops take tensors). An image that call cannot decode (PNG, WebP, CMYK or progressive
JPEGs nvJPEG refuses, corrupt bytes) falls back to Pillow on the CPU, and is that sample's error
only if Pillow cannot decode it either.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from typing import Any, Sequence

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODES = ("cpu", "gpu")


def effective_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on CUDA, fp32 elsewhere (a CPU without AMX gains nothing from bf16)."""
    if precision == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return precision


def autocast(precision: str, device: str) -> Any:
    """The autocast context for a precision on a device (nothing for fp32)."""
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_batch(blobs: Sequence[bytes], device: str) -> list[Any]:
    """Decode JPEG bytes on ``device`` in one batched call: uint8 CHW tensors, None where the
    batched decoder failed (those go to Pillow)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[Any] = []
        for d in data:  # one bad image fails the batch: find it by decoding one at a time
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def tensor_preprocess(preprocess: Any, image: Any) -> Any:
    """open_clip's transform on a decoded uint8 CHW tensor (on any device): float in [0, 1],
    then its resize, crop and normalize, which torchvision runs on tensors."""
    x = image.float().div_(255)
    return preprocess(x)


def pil_from_bytes(data: bytes) -> Any:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im
