"""Pruning quality, measured the way NVILA's Table 3 is: held-out caption accuracy per selection.

An SFT-shaped pool (``benchmarks/pruning/pool.py``): two pair sub-datasets, mostly usable
(injected noise ``--noise-rate``, 25 % by default: mismatched, wrong-colour and gibberish
captions, noise and blank images), with heavy redundancy in a few frequent attribute
combinations (near-identical easy samples). A trusted clean set trains the DFN filter and the
DeltaLoss models; a clean held-out set of the long tail (no frequent combination) measures.

Arms, each 50 % of every sub-dataset, curated through the real pipeline (scoring engine, policy
compiled to SQL, byte-exact reshard, manifest) and trained from the same initialization with
the same budget (``benchmarks/pruning/model.py``, the one place that sets model and budget):

  full | random_50 | clip_50 | deltaloss_50 | clip_then_deltaloss_50 (CLIP >= a threshold
  calibrated on the trusted set, then DeltaLoss down to 50 %)

Metric: caption accuracy on the held-out images (``training_hooks.evaluate``, the code behind
``curate eval``: greedy captions, fraction of attributes right) and held-out loss, mean and
std over ``--seeds`` (the pool and scores are built once; a seed sets the initialization, the
data order and the random arm's half). ``--compare-modes`` adds the other DeltaLoss mode's
arms (``deltaloss_<mode>_50``, ``clip_then_deltaloss_<mode>_50``).

    python benchmarks/pruning_quality.py [--seeds 0 1 2] [--pool 1200] [--noise-rate 0.25]
                                         [--json out.json] [--compare-modes]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args() -> argparse.Namespace:
    from benchmarks.pruning.model import STEPS
    from training_hooks.proxies import DEFAULT_MODE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pool", type=int, default=1200, help="pairs in the pool (60 %% sft_a, 40 %% sft_b)")
    ap.add_argument("--noise-rate", type=float, default=0.25, help="share of injected noise in the pool")
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps per arm (the same for all)")
    ap.add_argument("--trusted", type=int, default=400, help="trusted clean pairs (filter, DeltaLoss models)")
    ap.add_argument("--heldout", type=int, default=150, help="held-out long-tail pairs")
    ap.add_argument("--pool-seed", type=int, default=0)
    ap.add_argument("--proxy-steps", type=int, default=40, help="the small proxy's steps; rounds of the others")
    ap.add_argument("--proxy-rounds", type=int, default=3, help="most early-stopping rounds per proxy")
    ap.add_argument("--deltaloss-mode", choices=["capability", "reference"], default=DEFAULT_MODE)
    ap.add_argument("--compare-modes", action="store_true", help="also run the other DeltaLoss mode's arms")
    ap.add_argument("--json", help="write the results here (and the bar chart beside it, .png)")
    ap.add_argument("--chart", help="bar chart path (default: beside --json, or ./pruning_quality.png)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--keep", help="keep everything under this folder instead of a temporary one")
    args = ap.parse_args()
    if not 0 <= args.noise_rate <= 0.9:
        ap.error("--noise-rate must be in [0, 0.9]")
    return args


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from benchmarks.pruning import run as R

    args = parse_args()
    import torch

    # one intra-op thread: on a small shared machine more threads thrash instead of helping
    torch.set_num_threads(args.threads)
    t0 = time.time()
    modes = ["capability", "reference"] if args.compare_modes else [args.deltaloss_mode]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        prep = R.prepare(root, args, modes, print)
        runs = R.run_seeds(root, prep, R.arm_list(args.deltaloss_mode, modes), args.seeds, args.steps, print)
    summary = R.aggregate(runs)
    print()
    print(R.table(summary))
    print(f"\ntotal {time.time() - t0:.0f} s")
    R.write_outputs(args, summary, prep, time.time() - t0)


if __name__ == "__main__":
    main()
