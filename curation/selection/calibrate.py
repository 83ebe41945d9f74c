"""Filter thresholds calibrated on trusted data, not guessed.

A threshold rule such as "CLIP score >= t" should keep nearly every good sample. What a
good sample scores depends on the scorer (a trained DFN filter puts clean pairs near 0.9,
an off-the-shelf CLIP near 0.3), on the kind of sample (frames of a clip score differently
from photos) and on the dataset's captions. So the threshold is read off the score
distribution of a *trusted* set of the same kind, scored by the same scorer: ``t`` is the
trusted set's ``quantile`` (default :data:`DEFAULT_QUANTILE`, the 0.5th percentile), i.e. the
rule would drop about that share of trusted samples. A lower quantile keeps more clean
samples and lets more noise through. Why so low: a sample meets several rules in a row
(caption, dedup, CLIP, motion), the losses add up, and the corpus's clean samples sit a
little lower than trusted ones (the DFN filter's trusted-set 5th percentile was 0.90, the
corpus's clean 0.87 in the demo); at the 2nd percentile the demo kept only 95.5 % of clean
samples, at the 0.5th 97 %+, with no more noise let through (noise scores far lower).
Use a calibration set of a few hundred samples or more, so that the low quantile is stable.

The threshold is written into the rule (``min``) together with a ``calibration`` record
(trusted source, column, quantile, how many trusted samples, the value), so the policy file
and the manifest built from it say where every number came from.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

DEFAULT_QUANTILE = 0.005


class CalibrationError(ValueError):
    """Calibration cannot produce a threshold (no trusted scores, bad quantile)."""


def quantile_threshold(values: Iterable[float | None], quantile: float = DEFAULT_QUANTILE) -> tuple[float, int]:
    """The ``quantile`` of the finite values (linear interpolation) and how many there were."""
    import numpy as np

    if not 0 <= quantile < 1:
        raise CalibrationError(f"quantile must be in [0, 1), got {quantile}")
    arr = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    if arr.size == 0:
        raise CalibrationError("no trusted scores to calibrate on (every value missing)")
    return float(np.quantile(arr, quantile)), int(arr.size)


@dataclass
class TrustedColumn:
    """Trusted scores of one column, and where they came from (recorded in the policy)."""

    source: str
    values: Sequence[float | None]


def calibrate_policy(policy: dict[str, Any], trusted: dict[str, dict[str, TrustedColumn]],
                     quantile: float = DEFAULT_QUANTILE, digits: int = 4) -> dict[str, Any]:
    """A copy of ``policy`` (dict form) whose ``threshold`` rules with a ``min`` on a column that
    ``trusted[dataset]`` holds get ``min`` = the trusted ``quantile`` of that column, rounded down
    to ``digits`` decimals, and a ``calibration`` record. Other rules are left as they are."""
    out = copy.deepcopy(policy)
    for dataset, rules in out.get("datasets", {}).items():
        columns = trusted.get(dataset, {})
        for rule in rules:
            if rule.get("rule") != "threshold" or "min" not in rule or rule.get("column") not in columns:
                continue
            col = columns[rule["column"]]
            try:
                value, n = quantile_threshold(col.values, quantile)
            except CalibrationError as e:
                raise CalibrationError(f"datasets.{dataset}: {rule['column']} from {col.source}: {e}") from None
            scale = 10 ** digits
            rule["min"] = math.floor(value * scale) / scale
            rule["calibration"] = {"trusted": col.source, "column": rule["column"], "quantile": quantile,
                                   "samples": n, "value": round(value, 6)}
    return out


def score_trusted(shard_dirs: Sequence[str], scorers: Sequence[Any], batch_size: int = 64) -> dict[str, list]:
    """Score trusted shards in this process with ``scorers`` (the same classes and settings as
    the corpus is scored with, so that the distributions compare); columns by name, one value
    per readable sample (unreadable or failed samples are left out: they say nothing about what
    a good sample scores)."""
    from curation.data.shards import list_shards, read_shard

    cols: dict[str, list] = {}
    batch: list[Any] = []

    def flush() -> None:
        if not batch:
            return
        merged: dict[str, list] = {}
        ok = [True] * len(batch)
        for scorer in scorers:
            res = scorer.score(batch)
            ok = [o and e is None for o, e in zip(ok, res.pop("error"))]
            merged.update(res)
        for name, values in merged.items():
            cols.setdefault(name, []).extend(v for v, good in zip(values, ok) if good)
        batch.clear()

    for url in list_shards(list(shard_dirs)):
        for sample in read_shard(url):
            if sample.error is None:
                batch.append(sample)
            if len(batch) >= batch_size:
                flush()
    flush()
    return cols
