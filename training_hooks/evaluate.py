"""Evaluating an NVILA checkpoint: held-out loss, and caption accuracy on synthetic data.

Caption accuracy: the model writes a caption for each image (greedy decoding, the prompt
``Describe the image.``); the colour, shape, position and background it states are read out
of the caption by matching the synthetic corpus' vocabulary (``curation.corpus.synth``: the first
colour word is the shape's colour, the second the background's, as in every caption template)
and compared with what the ground truth (``ground_truth.parquet``) records for the image.
Accuracy is right attributes / attributes judged. Colour, shape and background are judged on
every image (a caption that leaves one out has it wrong); position is judged when the caption
states one, because two of the five synthetic caption templates never do, so a model trained on
them rightly often leaves it out. How often captions state a position is reported beside it.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Iterable, Sequence

import torch

from training_hooks.device import to_device
from training_hooks.gallery import write_gallery

IGNORE_INDEX = -100
ATTRIBUTES = ("color", "shape", "pos", "bg")  # the ground truth's names
DEFAULT_PROMPT = "Describe the image."


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


# --------------------------------------------------------------------------- captions


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption states, in the synthetic corpus' vocabulary (None: not stated)."""
    from curation.corpus.synth import COLORS, POSITIONS, SHAPES

    low = text.lower()
    words = re.findall(r"[a-z]+", low)
    colours = [w for w in words if w in COLORS]
    shapes = [w for w in words if w in SHAPES]
    pos = re.search(r"\b(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b", low)
    return {"color": colours[0] if colours else None, "shape": shapes[0] if shapes else None,
            "pos": pos.group(1) if pos else None, "bg": colours[1] if len(colours) > 1 else None}


def judge(said: dict[str, str | None], truth: dict[str, str]) -> dict[str, bool | None]:
    """Per attribute: right, wrong, or None (position not stated: not judged)."""
    out: dict[str, bool | None] = {a: said[a] == truth[a] for a in ("color", "shape", "bg")}
    out["pos"] = None if said["pos"] is None else said["pos"] == truth["pos"]
    return out


def caption_scores(judged: Iterable[dict[str, bool | None]]) -> dict[str, Any]:
    judged = list(judged)
    right = sum(v is True for j in judged for v in j.values())
    counted = sum(v is not None for j in judged for v in j.values())
    per = {}
    for a in ATTRIBUTES:
        vals = [j[a] for j in judged if j[a] is not None]
        per[a] = round(sum(vals) / len(vals), 4) if vals else None
    return {"caption_accuracy": round(right / counted, 4) if counted else None, "per_attribute": per,
            "position_stated": round(sum(j["pos"] is not None for j in judged) / len(judged), 4) if judged else None,
            "all_right": round(sum(all(v is not False for v in j.values()) for j in judged) / len(judged), 4)
            if judged else None, "images": len(judged)}


@torch.no_grad()
def generate_captions(model: Any, tok: Any, images: Sequence[Any], prompt: str = DEFAULT_PROMPT,
                      batch_size: int = 16, max_new_tokens: int = 40) -> list[str]:
    """Greedy captions for ``images`` (bytes or PIL), batched."""
    from model.conversation import IM_END, build_chat, collate
    from model.image_processing import layout_token_count

    model.eval()
    c = model.config
    device = next(model.parameters()).device
    end_id = tok.convert_tokens_to_ids(IM_END)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        exs = []
        for img in images[i: i + batch_size]:
            media = [model.preprocess_image(img)]
            exs.append(build_chat(tok, [{"role": "user", "content": f"<image>\n{prompt}"}], media,
                                  add_generation_prompt=True,
                                  media_lengths=[layout_token_count(media[0].layout, mode=c.image_mode, tile=c.tile_size,
                                                                    patch=c.patch_size, projector=c.projector_type)]))
        batch = to_device(collate(exs, tok.pad_token_id), device)
        new = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], max_new_tokens=max_new_tokens,
                             eos_token_id=end_id, pad_token_id=tok.pad_token_id)
        for row in new.tolist():
            if end_id in row:
                row = row[: row.index(end_id)]
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


# --------------------------------------------------------------------------- a checkpoint on shards


def load_truth(urls: Sequence[str], ground_truth: str | None) -> dict[tuple[str, str], dict[str, Any]] | None:
    """(dataset, key) -> {"noise", attributes...} from ``ground_truth`` or, when not given, from
    the ``ground_truth.parquet`` that ``curate synth`` writes beside the dataset folders."""
    import io
    import json

    import polars as pl

    from curation.data import storage

    paths = [ground_truth] if ground_truth else sorted({storage.join(storage.dirname(storage.dirname(u)), "ground_truth.parquet")
                                                        for u in urls})
    paths = [p for p in paths if storage.exists(p)]
    if ground_truth and not paths:
        raise FileNotFoundError(f"ground truth not found: {ground_truth}")
    if not paths:
        return None
    truth: dict[tuple[str, str], dict[str, Any]] = {}
    for p in paths:
        for row in pl.read_parquet(io.BytesIO(storage.read_bytes(p))).iter_rows(named=True):
            detail = json.loads(row["detail"] or "{}")
            truth[(row["dataset"], row["key"])] = {"noise": row["noise"], **{a: detail.get(a) for a in ATTRIBUTES}}
    return truth


def read_eval_samples(urls: Sequence[str], limit: int) -> tuple[list[Any], int]:
    """The first ``limit`` readable samples of the shards, and how many unreadable ones were met."""
    from curation.data.shards import read_shard

    samples, unreadable = [], 0
    for url in urls:
        for s in read_shard(url):
            if s.error:
                unreadable += 1
                continue
            samples.append(s)
            if len(samples) >= limit:
                return samples, unreadable
    return samples, unreadable


def evaluate(model: Any, tok: Any, samples: Sequence[Any], truth: dict | None, *, prompt: str = DEFAULT_PROMPT,
             batch_size: int = 16, max_length: int = 4096) -> dict[str, Any]:
    """Held-out loss per data kind over ``samples``, and captions (with accuracy where the
    ground truth knows a clean image) for every pair."""
    from model.examples import ExampleBuilder

    t0 = time.time()
    model.eval()
    builder = ExampleBuilder(model, tok, max_length, (prompt,))
    by_kind: dict[str, list[Any]] = {}
    for s in samples:
        ex = builder(s)
        if ex is not None:
            by_kind.setdefault(s.kind, []).append(ex)
    loss = {k: round(mean_token_loss(model, v, tok.pad_token_id, batch_size), 5) for k, v in by_kind.items()}
    pairs = [s for s in samples if s.kind == "pair"]
    if truth is not None:  # captions are judged on clean images only (noise has no true caption)
        pairs = [s for s in pairs if truth.get((s.dataset, s.key), {}).get("noise") == "clean"]
    captions = generate_captions(model, tok, [s.image for s in pairs], prompt, batch_size)
    rows = []
    for s, cap in zip(pairs, captions):
        row = {"dataset": s.dataset, "key": s.key, "generated": cap, "caption": s.caption, "image": s.image}
        if truth is not None:
            t = truth[(s.dataset, s.key)]
            row["truth"] = {a: t[a] for a in ATTRIBUTES}
            row["judged"] = judge(parse_caption(cap), row["truth"])
        rows.append(row)
    scores = caption_scores(r["judged"] for r in rows) if truth is not None else {"caption_accuracy": None}
    return {"heldout_loss": loss, "examples": {k: len(v) for k, v in by_kind.items()}, "skipped": dict(builder.skipped),
            **scores, "rows": rows, "seconds": round(time.time() - t0, 1)}


def evaluate_checkpoint(checkpoint: str, shards: Sequence[str] | str, *, ground_truth: str | None = None,
                        out_dir: str | None = None, limit: int = 200, gallery: int = 16, prompt: str = DEFAULT_PROMPT,
                        batch_size: int = 16) -> dict[str, Any]:
    """``curate eval``: load a checkpoint, evaluate it on the shards, write the gallery."""
    from curation.data.shards import list_shards
    from model import NVILAForCausalLM
    from model.nvila import load_tokenizer

    urls = list_shards(shards)
    if not urls:
        raise FileNotFoundError(f"no shards found in {shards}")
    truth = load_truth(urls, ground_truth)
    model = NVILAForCausalLM.from_pretrained(checkpoint)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(checkpoint)
    samples, unreadable = read_eval_samples(urls, limit)
    report = evaluate(model, tok, samples, truth, prompt=prompt, batch_size=batch_size)
    report.update({"checkpoint": checkpoint, "shards": len(urls), "samples": len(samples), "unreadable": unreadable,
                   "ground_truth": truth is not None})
    out_dir = out_dir or os.path.join(checkpoint, "eval")
    report["gallery"] = write_gallery(report["rows"][:gallery], out_dir, report)
    return report


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without image bytes (for JSON)."""
    rows = [{k: v for k, v in r.items() if k != "image"} for r in report.get("rows", [])]
    return {**{k: v for k, v in report.items() if k != "rows"}, "captions": rows}
