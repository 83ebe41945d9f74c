"""Pruning quality, measured the way NVILA's Table 3 is: held-out caption accuracy per selection.

Per seed (``--seeds``: each one draws its own pool, trusted, calibration, held-out and
pretraining sets, filter, proxies, scores and initialization; ``benchmarks/pruning/``):

- an SFT-shaped pool of two pair sub-datasets: near-identical renders of a few frequent
  combinations (the head), a long tail, and ``--noise-rate`` injected noise without tells
  (captions with exactly one attribute wrong, word salad, noise and blank images with the grain
  and sizes of clean ones; half the pool's captions in styles the trusted set never uses);
- a trusted set trains the DFN filter and two DeltaLoss proxies, a smaller and a ~9x larger
  NVILA, both trained to convergence (their held-out losses are in the JSON); a calibration set
  the filter never saw sets the CLIP threshold;
- a compositional held-out set: (shape, colour) pairs that no other set shows (vision
  pretraining, trusted, calibration, pool).

Arms, each 50 % of every sub-dataset (``full``: all), curated through the real pipeline
(scoring engine, policy compiled to SQL, reshard, manifest) and trained from the seed's
pretrained initialization (``benchmarks/pruning/model.py``, the one place that sets model and
budget): full | random_50 | clip_50 | likelihood_50 (top half by -loss_large alone) |
deltaloss_50 | clip_then_deltaloss_50 (CLIP >= the calibrated threshold, then DeltaLoss).
Plus ``oracle_50``, a ground-truth diagnostic, not a scorer: no injected noise, every clean tail
sample, head samples up to half; the ceiling of a 50 % selection at the budget.

Budget (``--budget``): ``epochs`` (default) gives every arm ``--epochs`` passes over its own
kept data, so a 50 % arm takes half the optimizer steps; ``steps`` gives every arm full data's
steps. Full data is also trained at 0.5x and 2x the epochs (its learning curve, ``full_curve``),
and the arms are compared with its best point. Metric: ``curate eval``'s caption accuracy on the
held-out images, mean and std over seeds; with each arm's kept count, optimizer steps, training
seconds and noise share of kept, and the Spearman correlation of delta_loss with -loss_large.

Seeds share nothing and run side by side, one process each (``--jobs``, default one per core);
``cpu_seconds`` in the JSON counts every process.

    python benchmarks/pruning_quality.py [--seeds 0 1 2] [--budget epochs|steps] [--jobs N] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


QUICK = {"pool": 300, "trusted": 120, "calib": 60, "heldout": 60, "pretrain_pairs": 2000, "pretrain_steps": 300,
         "epochs": 2.0, "proxy_rounds": 2, "seeds": [0]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.pruning.arms import ARMS, DIAGNOSTIC_ARMS
    from benchmarks.pruning.model import CURVE, EPOCHS, PRETRAIN_PAIRS, PRETRAIN_STEPS
    from training_hooks.proxies import DEFAULT_MODE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--budget", choices=["epochs", "steps"], default="epochs",
                    help="epochs: every arm the same passes over its own kept data; steps: every arm full data's steps")
    ap.add_argument("--epochs", type=float, default=None, help=f"passes over the kept data (default {EPOCHS:g})")
    ap.add_argument("--curve", type=float, nargs="+", default=None,
                    help="full data's learning curve, in multiples of --epochs (default 0.5 1 2)")
    ap.add_argument("--quick", action="store_true", help="small sets and budgets: checks the whole path in a few minutes")
    ap.add_argument("--pool", type=int, default=None, help="pairs in the pool (60 %% sft_a, 40 %% sft_b; default 1200)")
    ap.add_argument("--noise-rate", type=float, default=0.25, help="share of injected noise in the pool")
    ap.add_argument("--trusted", type=int, default=None, help="trusted clean pairs (filter, proxies; default 400)")
    ap.add_argument("--calib", type=int, default=None, help="calibration pairs for the CLIP threshold (default 150)")
    ap.add_argument("--heldout", type=int, default=None, help="held-out pairs of held-out combinations (default 150)")
    ap.add_argument("--pretrain-pairs", type=int, default=None, help=f"vision pretraining pairs (default {PRETRAIN_PAIRS})")
    ap.add_argument("--pretrain-steps", type=int, default=None, help=f"vision pretraining steps (default {PRETRAIN_STEPS})")
    ap.add_argument("--proxy-steps", type=int, default=40, help="steps per early-stopping round of the proxies")
    ap.add_argument("--proxy-rounds", type=int, default=None, help="most early-stopping rounds per proxy (default 10; give --small-proxy weak 30)")
    ap.add_argument("--proxy-data", choices=["trusted", "source"], default="trusted",
                    help="the proxies' training data: trusted (default), the filter's uniformly drawn trusted set; "
                         "source, clean pairs of the pool's own sources (its head/tail frequencies and caption styles)")
    ap.add_argument("--small-proxy", choices=["tiny", "weak"], default="tiny",
                    help="the small proxy: bootstrap's tiny (default) or weak (benchmarks/pruning/model.py SMALL_PROXY)")
    ap.add_argument("--large-proxy", choices=["small", "pretrained"], default="small",
                    help="the large proxy: bootstrap's small from random weights (default) or pretrained, the seed's "
                         "pretrained NVILA that every arm starts from (benchmarks/pruning/model.py benchmark_model)")
    ap.add_argument("--deltaloss-mode", choices=["capability", "reference"], default=DEFAULT_MODE)
    ap.add_argument("--compare-modes", action="store_true", help="also run the other DeltaLoss mode's arms")
    ap.add_argument("--arms", nargs="+", default=None, choices=[a for a in ARMS + DIAGNOSTIC_ARMS if a != "full"],
                    help="train only these arms (and full data, at each point of --curve); default: all")
    ap.add_argument("--json", help="write the results here (and the bar chart beside it, .png)")
    ap.add_argument("--chart", help="bar chart path (default: beside --json, or ./pruning_quality.png)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (per seed)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="seeds run at once, one process each (default: one per core, at most one per seed)")
    ap.add_argument("--keep", help="keep everything under this folder instead of a temporary one")
    args = ap.parse_args(argv)
    full = {"pool": 1200, "trusted": 400, "calib": 150, "heldout": 150, "pretrain_pairs": PRETRAIN_PAIRS,
            "pretrain_steps": PRETRAIN_STEPS, "epochs": EPOCHS, "proxy_rounds": 10, "seeds": [0, 1, 2]}
    for k, v in (QUICK if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.curve = sorted(set(args.curve or CURVE))
    args.jobs = max(1, min(len(args.seeds), args.jobs or os.cpu_count() or 1))
    if not 0 <= args.noise_rate <= 0.9:
        ap.error("--noise-rate must be in [0, 0.9]")
    if args.epochs <= 0 or min(args.curve) <= 0 or args.pool < 20 or min(args.trusted, args.calib, args.heldout) < 8:
        ap.error("--epochs and --curve must be > 0, --pool >= 20, --trusted, --calib and --heldout >= 8")
    return args


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from benchmarks.pruning import run as R

    args = parse_args()
    import resource

    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        preps, seeds = R.run_seeds(args, args.keep or tmp)
    summary = R.aggregate(seeds)
    print()
    print(R.table(summary))
    cpu = time.process_time() - c0 + sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))
    out = R.write_outputs(args, summary, preps, time.time() - t0, cpu)
    print(f"Spearman(delta_loss, -loss_large) {out['spearman_delta_vs_neg_loss_large']}; proxies' held-out loss "
          f"{out['proxies']['heldout_loss_mean']}; targets {out['targets']}")
    print(f"total {time.time() - t0:.0f} s wall, {cpu:.0f} CPU s")


if __name__ == "__main__":
    main()
