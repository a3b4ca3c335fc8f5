"""Per-head vs shared skip thresholds calibrated to one layer error budget (issue 9, item 2).

For each rule and error budget, calibrates per-head parameters (``per_head=True``) and one
shared parameter (``per_head=False``) on the video-like workload of
``pysparse_attn.workloads.video_qkv``, then checks each result independently of the
calibrator: every head is run alone through the backend with its own scalar parameter (heads
are independent, so this is what the per-head rule computes), the outputs are stacked and the
layer's relative L2 error against float64 dense attention and its tile sparsity are measured.

Usage::

    PYTHONPATH=$PWD python bench/calibrate_per_head.py --grid 21 15 13 --budgets 0.01 0.03

Prints a Markdown table (and the per-head parameters) to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time
import warnings

import numpy as np

import pysparse_attn as psa
from pysparse_attn.calibrate import calibrate_blasst, calibrate_cef, calibrate_recall
from pysparse_attn.workloads import video_qkv

CALIBRATORS = {"cef": calibrate_cef, "blasst": calibrate_blasst, "recall": calibrate_recall}


def verify(result, q, k, v, dense, block, backend):
    """Layer error and tile sparsity of running each head alone with its scalar parameter."""
    outs, kept = [], []
    for h, rule in enumerate(result.head_rules()):
        out, stats = psa.attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], skip=rule,
                                   block=block, backend=backend, return_stats=True)
        outs.append(np.asarray(out, dtype=np.float64))
        kept.append(np.asarray(stats.kept))
    out = np.concatenate(outs, axis=1)
    kept = np.concatenate(kept, axis=1)
    return float(np.linalg.norm(out - dense) / np.linalg.norm(dense)), float(1.0 - kept.mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(21, 15, 13),
                        help="token grid T H W (default 21 15 13: 4095 tokens)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--budgets", type=float, nargs="+", default=(0.01, 0.03))
    parser.add_argument("--rules", nargs="+", default=("cef",), choices=sorted(CALIBRATORS))
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    block = tuple(args.block)
    started = time.time()
    q, k, v = video_qkv(tuple(args.grid), heads=args.heads, head_dim=args.head_dim,
                        dtype=np.float32, seed=args.seed)
    # float64 dense attention on the float32 inputs: the reference every error is measured to.
    dense = np.asarray(psa.attention(*(x.astype(np.float64) for x in (q, k, v)), block=block,
                                     backend="cpu"), dtype=np.float64)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
          f"{commit}, {platform.processor() or platform.machine()}, backend {args.backend}")
    print(f"workload: video_qkv(grid={tuple(args.grid)}, heads={args.heads}, "
          f"head_dim={args.head_dim}, float32, seed={args.seed}), N = {q.shape[2]}, "
          f"block = {block}, order = peak\n")
    print("| rule | budget | thresholds | calibrated error | calibrated sparsity | "
          "verified error | verified sparsity | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    details = []
    for name in args.rules:
        for budget in args.budgets:
            for per_head in (True, False):
                options = dict(v=v, max_error=budget, per_head=per_head, block=block)
                if name != "blasst":
                    options["backend"] = args.backend
                tic = time.time()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = CALIBRATORS[name](q, k, **options)
                seconds = time.time() - tic
                error, sparsity = verify(result, q, k, v, dense, block, args.backend)
                mode = "per head" if per_head else "shared"
                flag = "" if result.met else " (budget not met)"
                print(f"| {name} | {budget:.0%} | {mode}{flag} | {result.error:.4%} | "
                      f"{result.sparsity:.1%} | {error:.4%} | {sparsity:.1%} | {seconds:.0f} |")
                details.append((name, budget, mode, result.params, result.head_sparsity,
                                result.head_error, [str(w.message) for w in caught]))
    print("\nper-head parameters (rule units), head sparsity, head relative error:")
    for name, budget, mode, params, head_sparsity, head_error, caught in details:
        print(f"- {name} {budget:.0%} {mode}: params {np.array2string(params, precision=3)}")
        print(f"  sparsity {np.array2string(head_sparsity, precision=3)}")
        print(f"  error {np.array2string(head_error, precision=4)}")
        for message in caught:
            print(f"  warning: {message}")
    print(f"\ntotal time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
