"""The noise injected into the synthetic corpus: its names per kind, default rates, and the
byte-level damage (corrupt, truncated, gibberish) it is made of, and exact duplicates of earlier
clean samples (:func:`with_exact_duplicates`)."""

from __future__ import annotations

import json
from typing import Callable, Iterator

import numpy as np

PAIR_NOISE = (
    "mismatched_caption",
    "noise_image",
    "blank_image",
    "exact_duplicate",
    "near_duplicate",
    "corrupt_image",
    "truncated_member",
    "tiny_image",
    "extreme_aspect",
    "empty_caption",
    "gibberish_caption",
)
INTERLEAVED_NOISE = (
    "distractor_images",
    "mismatched_doc",
    "corrupt_image",
    "exact_duplicate",
    "gibberish_text",
)
VIDEO_NOISE = (
    "mismatched_caption",
    "static_video",
    "noise_video",
    "corrupt_video",
    "truncated_member",
    "exact_duplicate",
    "empty_caption",
)
NOISE_TYPES = {"pair": PAIR_NOISE, "interleaved": INTERLEAVED_NOISE, "video": VIDEO_NOISE}
# Noise a reader must report as an unreadable sample (the rest is readable but useless)
UNREADABLE_NOISE = {"corrupt_image", "truncated_member", "corrupt_video"}

DEFAULT_PAIR_RATES = {
    "mismatched_caption": 0.10,
    "noise_image": 0.03,
    "blank_image": 0.03,
    "exact_duplicate": 0.04,
    "near_duplicate": 0.04,
    "corrupt_image": 0.02,
    "truncated_member": 0.02,
    "tiny_image": 0.02,
    "extreme_aspect": 0.02,
    "empty_caption": 0.02,
    "gibberish_caption": 0.03,
}
DEFAULT_INTERLEAVED_RATES = {
    "distractor_images": 0.15,
    "mismatched_doc": 0.08,
    "corrupt_image": 0.04,
    "exact_duplicate": 0.04,
    "gibberish_text": 0.04,
}
DEFAULT_VIDEO_RATES = {
    "mismatched_caption": 0.12,
    "static_video": 0.06,
    "noise_video": 0.04,
    "corrupt_video": 0.03,
    "truncated_member": 0.02,
    "exact_duplicate": 0.04,
    "empty_caption": 0.03,
}


def gibberish(rng: np.random.Generator, words: int = 8) -> str:
    letters = np.array(list("qwxzjkvbpgfdhlmntrs"))
    return " ".join("".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(words))


def corrupt_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """Garble the header so no decoder recognizes the format, keep the length."""
    head = bytes(rng.integers(0, 256, size=min(64, len(data)), dtype=np.uint8))
    return head + data[len(head):]


def truncate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: max(16, int(len(data) * float(rng.uniform(0.3, 0.6))))]


def assign_noise(rng: np.random.Generator, rates: dict[str, float], count: int) -> list[str]:
    """Noise labels for ``count`` samples: exact proportions per shard (largest remainder,
    random tie-breaks), randomly placed. The first sample is clean when any is, so that
    duplicates always have a clean source earlier in the shard."""
    want = {k: v * count for k, v in rates.items() if v > 0}
    n_noise = min(count, int(round(sum(want.values()))))
    counts = {k: int(np.floor(v)) for k, v in want.items()}
    rest = n_noise - sum(counts.values())
    order = sorted(want, key=lambda k: (want[k] - counts[k]) + float(rng.random()) * 1e-6, reverse=True)
    for k in order[: max(0, rest)]:
        counts[k] += 1
    labels = [k for k, c in counts.items() for _ in range(c)]
    labels += ["clean"] * (count - len(labels))
    labels = [labels[i] for i in rng.permutation(len(labels))]
    if "clean" in labels and labels and labels[0] != "clean":
        j = labels.index("clean")
        labels[0], labels[j] = labels[j], labels[0]
    return labels


def with_exact_duplicates(rng: np.random.Generator, labels: list[str], shard_idx: int,
                          make: Callable[[str, str], tuple[dict, dict]], keep: int = 16) -> Iterator[tuple[dict, dict]]:
    """(webdataset sample, ground-truth row) for each noise label of a shard: an ``exact_duplicate`` is
    one of the last ``keep`` clean samples again under a new key (a clean sample is made while there
    is none yet); every other sample is ``make(key, noise)`` -> (sample, ground-truth detail)."""
    recent: list[tuple[str, dict]] = []
    for i, noise in enumerate(labels):
        key = f"{shard_idx:05d}{i:04d}"
        if noise == "exact_duplicate" and not recent:
            noise = "clean"
        if noise == "exact_duplicate":
            src_key, src = recent[int(rng.integers(len(recent)))]
            sample = {"__key__": key, **{k: v for k, v in src.items() if k != "__key__"}}
            yield sample, {"key": key, "noise": noise, "source_key": src_key, "detail": "{}"}
            continue
        sample, detail = make(key, noise)
        if noise == "clean":
            recent.append((key, sample))
            recent = recent[-keep:]
        yield sample, {"key": key, "noise": noise, "source_key": None, "detail": json.dumps(detail)}
