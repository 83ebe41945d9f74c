"""How the DeltaLoss proxies rank the pool, against the ground truth no scorer sees: the pruning
benchmark's preparation alone (sets, filter, proxies, scores) for one seed, no arm trained.

Prints the proxies' held-out losses, mean ``delta_loss`` (and both proxies' losses) per
ground-truth label (head, tail, each noise kind), the head/tail/noise shares of the top half of
each sub-dataset by ``delta_loss``, by ``-loss_large`` and by CLIP score against the pool's
(what a random half keeps), and Spearman(``delta_loss``, ``-loss_large``). Takes the benchmark's
flags (``benchmarks/pruning_quality.py``); the first seed of ``--seeds`` is used.

    python -m benchmarks.pruning.diagnose OUT_DIR --seeds 100 [benchmark flags...]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Any


def label(row: dict[str, Any]) -> str:
    """head, tail or the noise kind of a ground-truth row."""
    if row["noise"] != "clean":
        return row["noise"]
    return "head" if json.loads(row["detail"]).get("group") == "head" else "tail"


def group(lab: str) -> str:
    return lab if lab in ("head", "tail") else "noise"


def top_half_shares(rows: list[tuple], sizes: dict[str, int], truth: dict, col: int, ascending: bool = False) -> dict[str, float]:
    """head/tail/noise shares of the top half of each sub-dataset by ``rows[col]``."""
    counts: dict[str, int] = {}
    for ds, n in sizes.items():
        ranked = sorted((r for r in rows if r[0] == ds), key=lambda r: r[col], reverse=not ascending)
        for r in ranked[: n // 2]:
            g = group(label(truth[(r[0], r[1])]))
            counts[g] = counts.get(g, 0) + 1
    total = sum(counts.values()) or 1
    return {g: round(c / total, 3) for g, c in sorted(counts.items())}


def diagnose(prep: dict[str, Any], mode: str) -> dict[str, Any]:
    from curation.scoring.store import ScoreStore

    truth = {(r["dataset"], r["key"]): r for r in prep["sets"]["truth"]}
    rows = ScoreStore(prep["works"][mode]).con.execute(
        "SELECT d.dataset, d.key, d.delta_loss, d.loss_small, d.loss_large, c.clip_score FROM deltaloss d "
        "JOIN clip c USING (dataset, key) WHERE d.delta_loss IS NOT NULL").fetchall()
    by: dict[str, list[tuple]] = {}
    for r in rows:
        by.setdefault(label(truth[(r[0], r[1])]), []).append(r)
    means = {lab: {"n": len(v), **{k: round(statistics.fmean(r[i] for r in v), 3)
                                   for k, i in (("delta_loss", 2), ("loss_small", 3), ("loss_large", 4))}}
             for lab, v in sorted(by.items())}
    pool: dict[str, int] = {}
    for v in truth.values():
        pool[group(label(v))] = pool.get(group(label(v)), 0) + 1
    return {"by_label": means, "top_half": {
        "delta_loss": top_half_shares(rows, prep["sizes"], truth, 2),
        "-loss_large": top_half_shares(rows, prep["sizes"], truth, 4, ascending=True),
        "clip_score": top_half_shares(rows, prep["sizes"], truth, 5),
        "pool (random)": {g: round(c / len(truth), 3) for g, c in sorted(pool.items())}},
        "spearman_delta_vs_neg_loss_large": prep["spearman"], "clip_threshold": prep["clip_min"]}


def main(argv: list[str]) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    from benchmarks.pruning import run as R
    from benchmarks.pruning_quality import parse_args

    root, args = argv[0], parse_args(argv[1:])
    torch.set_num_threads(args.threads)
    c0 = time.process_time()
    prep = R.prepare(root, args, args.seeds[0], [args.deltaloss_mode], print)
    out = diagnose(prep, args.deltaloss_mode)
    cpu = time.process_time() - c0 + sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f)
                                         for f in ("ru_utime", "ru_stime"))
    for lab, m in out["by_label"].items():
        print(f"{lab:<20} n={m['n']:4d}  delta_loss {m['delta_loss']:7.3f}  loss small {m['loss_small']:6.3f}  "
              f"large {m['loss_large']:6.3f}")
    for by, shares in out["top_half"].items():
        print(f"top half by {by}: " + ", ".join(f"{g} {s:.1%}" for g, s in shares.items()))
    print(f"Spearman(delta_loss, -loss_large) {out['spearman_delta_vs_neg_loss_large']}; CLIP threshold "
          f"{out['clip_threshold']:.3f}; {R.proxy_summary(prep['models'])}; timings {prep['timings']}; {cpu:.0f} CPU s")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1:])
